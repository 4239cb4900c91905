"""The global throttle against a real Redis: one process's calls.

Pace, interactive reserve, token and request limits, settle and release, waiting
(max_wait, stop, pause), late starts, the window's margin, the keys' lifetimes and
the Redis round trips per call. Times asserted are the admissions' Redis times
(``Admission.at_ms``), the clock the scripts decide on; only upper bounds allow for a
late wake-up. The room for other clients, racing threads and processes and the seed
are in test_throttle_neighbours.py.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import redis

from jobs.constants import (
    throttle_costs_key,
    throttle_log_key,
    throttle_pace_key,
    throttle_pause_key,
    throttle_room_key,
    throttle_total_key,
)
from jobs.models import Priority
from tests.integration.throttle_helpers import (
    BUCKET,
    LATE_MS,
    CountingRedis,
    costs,
    counting_client,
    gaps,
    log_size,
    make,
    members,
    redis_now_ms,
)
from worker.throttle import (
    POLL_S,
    ROOM_KEEP_WINDOWS,
    Admission,
    RequestTooLarge,
    Throttle,
    ThrottleInterrupted,
    ThrottleTimeout,
    WindowUsage,
    no_history,
)
from worker.throttle_scripts import Look

pytestmark = pytest.mark.integration

BULK, INTERACTIVE = Priority.BULK, Priority.INTERACTIVE


# --- pace -----------------------------------------------------------------------------


def test_bulk_calls_take_turns_one_window_over_limit_apart(
    r: CountingRedis, redis_url: str
) -> None:
    throttle = make(r, rpm=10, tpm=10_000, window_s=1.0)  # a turn every 100 ms
    first = [throttle.acquire(1) for _ in range(8)]
    for k, admission in enumerate(first):
        assert admission.at_ms >= first[0].at_ms + 100 * k  # never ahead of the schedule
    assert first[-1].at_ms <= first[0].at_ms + 700 + LATE_MS
    # The turns are shared: a second instance on its own connection (another process,
    # as far as Redis can tell) takes turns with the first, never alongside it.
    other_client = redis.Redis.from_url(redis_url)
    try:
        other = make(other_client, rpm=10, tpm=10_000, window_s=1.0)
        time.sleep(1.0)

        def four(t: Throttle) -> list[int]:
            return [t.acquire(1).at_ms for _ in range(4)]

        with ThreadPoolExecutor(2) as pool:
            both = [at for run in pool.map(four, (throttle, other)) for at in run]
    finally:
        other_client.close()
    # A turn taken a little late keeps the schedule, so turns lie at least half a gap
    # apart, and eight of them span seven gaps.
    assert min(gaps(both)) >= 50
    assert max(both) - min(both) >= 700


def test_an_idle_bucket_starts_its_turns_anew(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=10_000, window_s=1.0)
    before = [throttle.acquire(1) for _ in range(3)]
    time.sleep(0.6)  # six turns missed while idle: none of them may be caught up
    after = [throttle.acquire(1, max_wait=0)]  # the first after an idle spell goes at once
    after += [throttle.acquire(1) for _ in range(3)]
    assert after[0].at_ms >= before[-1].at_ms + 600
    for k, admission in enumerate(after):
        assert admission.at_ms >= after[0].at_ms + 100 * k
    assert after[-1].at_ms <= after[0].at_ms + 300 + LATE_MS


def test_where_tokens_bind_bulk_calls_are_not_paced(r: CountingRedis) -> None:
    # 300 tokens are a larger share of the window's tokens than one call of its requests.
    throttle = make(r, rpm=10, tpm=1000, window_s=1.0)
    first = [throttle.acquire(300, max_wait=0) for _ in range(3)]
    assert first[-1].at_ms - first[0].at_ms < 100  # no turns of 100 ms
    fourth = throttle.acquire(300)  # as soon as tokens are free
    assert first[0].at_ms + 1000 <= fourth.at_ms <= first[0].at_ms + 1000 + LATE_MS


def test_interactive_calls_are_not_paced(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=10_000, window_s=2.0)  # bulk turns 200 ms apart
    throttle.acquire(1, max_wait=0)  # a bulk turn taken just now
    calls = [throttle.acquire(1, max_wait=0, priority=INTERACTIVE) for _ in range(9)]
    assert calls[-1].at_ms - calls[0].at_ms < 100
    assert throttle.usage() == WindowUsage(requests=10, tokens=10)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0, priority=INTERACTIVE)  # the window is full


def test_interactive_calls_take_turns_without_waiting_for_them(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=10_000, window_s=1.0)  # a turn every 100 ms
    first = throttle.acquire(1, max_wait=0)
    throttle.acquire(1, max_wait=0, priority=INTERACTIVE)  # takes the next turn now
    after = throttle.acquire(1)
    assert first.at_ms + 200 <= after.at_ms <= first.at_ms + 200 + LATE_MS


# --- the interactive reserve ----------------------------------------------------------


def test_bulk_leaves_the_reserve_free_while_it_waits(r: CountingRedis) -> None:
    # Bulk may fill 4 of the 6 places, one turn every 166 ms.
    throttle = make(r, rpm=6, tpm=10_000, window_s=1.0, interactive_reserve=2)
    bulk = [throttle.acquire(1) for _ in range(4)]
    with ThreadPoolExecutor(1) as pool:
        fifth: Future[Admission] = pool.submit(throttle.acquire, 1)
        time.sleep(0.1)
        assert not fifth.done()  # waiting, its thread asking for the bulk calls
        reserve = [throttle.acquire(1, max_wait=0, priority=INTERACTIVE) for _ in range(2)]
        with pytest.raises(ThrottleTimeout):
            throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
        late = fifth.result(timeout=10)
    assert all(a.at_ms < bulk[0].at_ms + 1000 for a in reserve)
    # With the reserve in use, bulk needs three calls to leave, not one.
    assert late.at_ms >= bulk[2].at_ms + 1000


def test_room_freed_while_interactive_uses_the_reserve_goes_to_interactive_first(
    r: CountingRedis,
) -> None:
    throttle = make(r, rpm=4, tpm=10_000, window_s=1.0, interactive_reserve=2)  # bulk: 2
    b1 = throttle.acquire(1, max_wait=0)
    i1 = throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    time.sleep(0.3)
    throttle.acquire(1, max_wait=0, priority=INTERACTIVE)  # i2
    time.sleep(0.3)
    i3 = throttle.acquire(1, max_wait=0, priority=INTERACTIVE)  # full: b1, i1, i2, i3
    with ThreadPoolExecutor(3) as pool:
        b2: Future[Admission] = pool.submit(throttle.acquire, 1)
        waiting = [pool.submit(throttle.acquire, 1, priority=INTERACTIVE) for _ in range(2)]
        late_bulk = b2.result(timeout=10)
        waited = [f.result(timeout=10) for f in waiting]
    # b1 and i1 leave (a few ms apart on a busy machine): both places go to the
    # waiting interactive calls, one each ...
    first, second = sorted(a.at_ms for a in waited)
    assert b1.at_ms + 1000 <= first <= b1.at_ms + 1000 + LATE_MS
    assert i1.at_ms + 1000 <= second <= i1.at_ms + 1000 + LATE_MS
    # ... and bulk gets in only once the window holds less than its share again: not
    # as i2 or i3 leave, but once the two interactive calls it waited with leave too.
    assert i3.at_ms + 1000 < min(a.at_ms for a in waited) + 1000 <= late_bulk.at_ms


def test_while_an_interactive_call_waits_bulk_waits_too(r: CountingRedis) -> None:
    throttle = make(r, rpm=100, tpm=1000, window_s=1.0)  # tokens bind: no turns
    a = throttle.acquire(500, max_wait=0)
    time.sleep(0.3)
    b = throttle.acquire(400, max_wait=0)
    with ThreadPoolExecutor(1) as pool:
        waiting: Future[Admission] = pool.submit(throttle.acquire, 600, priority=INTERACTIVE)
        time.sleep(0.1)  # it waits for a to leave
        small = throttle.acquire(10)  # would fit now, but the room is the waiting call's
        big = waiting.result(timeout=10)
    assert a.at_ms + 1000 <= big.at_ms <= a.at_ms + 1000 + LATE_MS
    assert small.at_ms >= b.at_ms + 1000  # then the window is full again until b leaves


def test_bulk_leaves_the_reserved_share_of_tokens(r: CountingRedis) -> None:
    # 2 of 10 requests reserved: 200 of the 1000 tokens too.
    throttle = make(r, rpm=10, tpm=1000, window_s=1.0, interactive_reserve=2)
    throttle.acquire(700)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(101, max_wait=0.5)  # 801 > 800 until the 700 leave, 1 s on
    throttle.acquire(300, max_wait=0, priority=INTERACTIVE)
    assert throttle.usage() == WindowUsage(requests=2, tokens=1000)
    # Not even an empty window lets bulk take it.
    empty = Throttle(
        r, "other:1", rpm=10, tpm=1000, window_s=1.0, interactive_reserve=2, seed=no_history
    )
    with pytest.raises(ThrottleTimeout):
        empty.acquire(801, max_wait=0.5)
    assert empty.acquire(801, max_wait=0, priority=INTERACTIVE).tokens == 801


# --- tokens, settle, release ----------------------------------------------------------


def test_the_token_limit_binds(r: CountingRedis) -> None:
    throttle = make(r, rpm=100, tpm=100, window_s=1.0)
    a = throttle.acquire(60, max_wait=0, priority=INTERACTIVE)
    throttle.acquire(40, max_wait=0, priority=INTERACTIVE)  # exactly the budget
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    c = throttle.acquire(1, priority=INTERACTIVE)
    assert a.at_ms + 1000 <= c.at_ms <= a.at_ms + 1000 + LATE_MS


def test_settle_frees_tokens_at_once_and_release_frees_the_request(r: CountingRedis) -> None:
    throttle = make(r, rpm=3, tpm=100, window_s=1.0)
    a = throttle.acquire(60, max_wait=0, priority=INTERACTIVE)
    b = throttle.acquire(40, max_wait=0, priority=INTERACTIVE)
    throttle.settle(a, 10)  # reserved 60, charged 10
    assert costs(r)[a.id] == 10
    c = throttle.acquire(50, max_wait=0, priority=INTERACTIVE)  # fits only thanks to it
    assert throttle.usage() == WindowUsage(requests=3, tokens=100)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(0, max_wait=0, priority=INTERACTIVE)  # three requests: full
    throttle.release(b)
    assert b.id not in members(r)
    assert b.id not in costs(r)
    throttle.acquire(0, max_wait=0, priority=INTERACTIVE)
    assert throttle.usage() == WindowUsage(requests=3, tokens=60)
    assert set(members(r)) >= {a.id, c.id}


def test_each_try_is_priced_again(r: CountingRedis) -> None:
    throttle = make(r, rpm=2, tpm=1000, window_s=1.0)
    a = throttle.acquire(1, priority=INTERACTIVE)
    time.sleep(0.3)
    throttle.acquire(1, priority=INTERACTIVE)
    prices = iter(range(5, 100))
    priced: list[int] = []

    def price() -> int:
        priced.append(next(prices))
        return priced[-1]

    admission = throttle.acquire(price, priority=INTERACTIVE)
    # Asked once, told to wait about 0.7 s, asked again at least every POLL_S meanwhile.
    assert 2 + int(0.6 / POLL_S) <= len(priced) <= 2 + math.ceil(0.8 / POLL_S)
    assert admission.tokens == priced[-1]
    assert a.at_ms + 1000 <= admission.at_ms <= a.at_ms + 1000 + LATE_MS
    assert costs(r)[admission.id] == priced[-1]


def test_calls_in_flight_are_priced_again_after_an_answer(r: CountingRedis) -> None:
    """An answer teaches the calibration: the calls still in flight are charged their
    price now, so a window priced from the raw estimate fills at once. A call answered
    meanwhile keeps its settlement, and one with an unchanged price costs no command."""
    throttle = make(r, rpm=10, tpm=300, window_s=5.0)
    factor = [1.0]

    def price() -> int:
        return round(100 * factor[0])

    a, b, c = (throttle.acquire(price, max_wait=0, priority=INTERACTIVE) for _ in range(3))
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(price, max_wait=0, priority=INTERACTIVE)  # 300 of 300 tokens
    factor[0] = 0.5  # the first answer: the provider counts half the raw estimate
    throttle.settle(a, 50)
    sent = throttle.stats().redis_round_trips
    throttle.reprice()
    assert throttle.stats().redis_round_trips == sent + 1
    assert costs(r) == {a.id: 50, b.id: 50, c.id: 50}
    d = throttle.acquire(price, max_wait=0, priority=INTERACTIVE)  # fits only thanks to it
    # Another thread settles b between the pricing and the script: its charge stays.
    factor[0] = 0.6
    store, settle = throttle._store, throttle._store.settle

    def settled_meanwhile(changes: Sequence[tuple[str, int, int | None]], span_ms: int) -> Look:
        settle([(b.id, 7, None)], span_ms)
        return settle(changes, span_ms)

    store.settle = settled_meanwhile  # type: ignore[assignment,method-assign]
    throttle.reprice()
    store.settle = settle  # type: ignore[method-assign]
    assert costs(r) == {a.id: 50, b.id: 7, c.id: 60, d.id: 60}
    throttle.settle(b, 7)
    sent = throttle.stats().redis_round_trips
    throttle.reprice()  # nothing new to learn: nothing sent
    assert throttle.stats().redis_round_trips == sent


def test_a_call_never_settled_is_forgotten_once_out_of_the_window(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=300, window_s=0.3)
    factor = [1.0]
    throttle.acquire(lambda: round(100 * factor[0]), max_wait=0, priority=INTERACTIVE)
    time.sleep(0.4)  # its slot was never given back, and it has left the window
    factor[0] = 0.5
    sent = throttle.stats().redis_round_trips
    throttle.reprice()
    assert throttle.stats().redis_round_trips == sent  # nothing left to price again


def test_bad_costs_are_refused_before_asking_redis(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=100, window_s=1.0)
    with pytest.raises(RequestTooLarge, match=r"101 tokens .* only 100 tokens"):
        throttle.acquire(101)
    with pytest.raises(ValueError, match="negative"):
        throttle.acquire(-1)
    assert throttle.stats().redis_round_trips == 0
    admission = throttle.acquire(100, max_wait=0)  # exactly the budget is fine
    with pytest.raises(ValueError, match="negative"):
        throttle.settle(admission, -1)
    with pytest.raises(ValueError, match="negative"):
        throttle.pause(-0.5)
    assert costs(r) == {admission.id: 100}


# --- waiting: max_wait, stop, pause ---------------------------------------------------


def test_a_timeout_is_told_up_front_and_logs_nothing(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=2.0)
    a = throttle.acquire(1)
    started = time.monotonic()
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=1.0, priority=INTERACTIVE)
    assert time.monotonic() - started < 0.5  # 2 s to wait > 1 s: refused without waiting
    assert members(r).keys() == costs(r).keys() == {a.id}
    b = throttle.acquire(1, max_wait=3, priority=INTERACTIVE)
    assert a.at_ms + 2000 <= b.at_ms <= a.at_ms + 2000 + LATE_MS


def test_max_wait_zero_means_only_now(r: CountingRedis) -> None:
    throttle = make(r, rpm=2, tpm=1000, window_s=1.0)
    throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    throttle.acquire(1, max_wait=-5, priority=INTERACTIVE)
    started = time.monotonic()
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0, priority=INTERACTIVE)
    assert time.monotonic() - started < 0.2
    assert log_size(r) == 2


def test_stop_and_max_wait_reach_threads_queued_behind_the_asking_one(
    r: CountingRedis,
) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=30.0)
    throttle.acquire(1)
    stop = threading.Event()
    done: dict[str, float] = {}

    def wait(name: str) -> None:
        with pytest.raises(ThrottleInterrupted):
            throttle.acquire(1, stop=stop)
        done[name] = time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        try:
            asking = pool.submit(wait, "asking")
            time.sleep(0.2)  # it asked and sleeps toward its 30 s turn
            queued = pool.submit(wait, "queued")  # waits behind it in this process
            time.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(ThrottleTimeout):
                throttle.acquire(1, max_wait=0)  # no time to queue at all
            at_once = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(ThrottleTimeout):
                throttle.acquire(1, max_wait=0.5)  # queues for 0.5 s, not a whole check
            queued_for = time.monotonic() - started
        finally:
            stopped = time.monotonic()
            stop.set()
        asking.result(timeout=5)
        queued.result(timeout=5)
    assert at_once < 0.2
    assert 0.5 <= queued_for < 0.9
    assert done["asking"] - stopped < 0.3
    assert done["queued"] - stopped < 1.5  # queued threads look at it every second
    assert log_size(r) == 1
    sent = throttle.stats().redis_round_trips
    with pytest.raises(ThrottleInterrupted):
        throttle.acquire(1, stop=stop)
    assert throttle.stats().redis_round_trips == sent


def test_a_pause_holds_back_a_waiting_call(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=1.0)
    assert throttle.paused_for() == 0.0
    a = throttle.acquire(1, priority=INTERACTIVE)
    with ThreadPoolExecutor(1) as pool:
        waiting: Future[Admission] = pool.submit(throttle.acquire, 1, priority=INTERACTIVE)
        time.sleep(0.2)  # due at a + 1 s
        throttle.pause(1.5)
        until = int(r.get(throttle_pause_key(BUCKET)) or 0)
        assert 1.2 < throttle.paused_for() <= 1.5
        held = waiting.result(timeout=10)
    assert until >= a.at_ms + 1500
    assert until <= held.at_ms <= until + LATE_MS
    assert throttle.paused_for() == 0.0


def test_a_pause_never_shortens(r: CountingRedis) -> None:
    throttle = make(r, rpm=5, tpm=1000, window_s=1.0)
    throttle.pause(3)
    throttle.pause(1)
    sent = throttle.stats().redis_round_trips
    throttle.pause(0)  # nothing to do: no round trip
    assert throttle.stats().redis_round_trips == sent
    assert 2.5 < throttle.paused_for() <= 3
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=1.5, priority=INTERACTIVE)
    assert log_size(r) == 0


# --- late starts ----------------------------------------------------------------------


def test_a_call_on_time_costs_no_round_trip(r: CountingRedis) -> None:
    throttle = make(r, rpm=5, tpm=1000, window_s=1.0)  # late after 100 ms
    admission = throttle.acquire(1)
    trips, sent = throttle.stats().redis_round_trips, r.sent
    assert throttle.starting(admission) is admission
    assert throttle.starting(admission, sent=True) is admission
    assert (throttle.stats().redis_round_trips, r.sent) == (trips, sent)


def test_a_late_call_admits_itself_again_at_its_real_start(r: CountingRedis) -> None:
    # One request a window: the late call gives its own place back as it takes it again.
    throttle = make(r, rpm=1, tpm=1000, window_s=1.0, late_start_ms=50)
    admission = throttle.acquire(7, priority=INTERACTIVE)
    time.sleep(0.2)
    before = redis_now_ms(r)
    again = throttle.starting(admission)
    assert (again.id, again.tokens) == (admission.id, 7)
    assert max(before, admission.at_ms + 200) <= again.at_ms <= before + LATE_MS
    assert members(r) == {admission.id: again.at_ms}  # moved, not added
    assert costs(r) == {admission.id: 7}
    assert throttle.starting(again) is again  # on time from its new admission
    throttle.settle(again, 3)
    assert costs(r) == {admission.id: 3}


def test_a_late_call_waits_when_the_window_has_no_room(r: CountingRedis) -> None:
    throttle = make(r, rpm=2, tpm=1000, window_s=1.0, late_start_ms=50)
    early = throttle.acquire(1, priority=INTERACTIVE)
    throttle.acquire(1, priority=INTERACTIVE)
    # Two more calls take the places as these two leave, a second on ...
    taken = [throttle.acquire(1, priority=INTERACTIVE) for _ in range(2)]
    # ... and then the first one starts: it waits until one of them leaves.
    again = throttle.starting(early)
    first_out = min(a.at_ms for a in taken) + 1000
    assert first_out <= again.at_ms <= first_out + LATE_MS
    assert members(r)[early.id] == again.at_ms


def test_a_call_already_sent_is_logged_at_once_whatever_the_limits(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=1.0, late_start_ms=50)
    admission = throttle.acquire(1, priority=INTERACTIVE)
    time.sleep(0.2)
    throttle.pause(5)  # nothing else is admitted for 5 s
    started = time.monotonic()
    moved = throttle.starting(admission, sent=True)
    assert time.monotonic() - started < 0.2
    assert moved.at_ms >= admission.at_ms + 200
    assert members(r) == {admission.id: moved.at_ms}
    r.flushdb()
    time.sleep(0.1)
    # With the log lost, the ledger's history will count it: nothing to move.
    assert throttle.starting(moved, sent=True) is moved
    assert log_size(r) == 0


# --- the window's margin --------------------------------------------------------------


def test_the_log_keeps_calls_a_margin_past_the_providers_window(r: CountingRedis) -> None:
    throttle = make(r, rpm=2, tpm=1000, window_s=1.0, margin_s=0.5)
    first = throttle.acquire(5, priority=INTERACTIVE)
    assert first.ours == (1, 5)
    time.sleep(1.1)
    second = throttle.acquire(7, max_wait=0, priority=INTERACTIVE)
    assert second.ours == (1, 7)  # the first left the provider's window ...
    assert throttle.usage() == WindowUsage(requests=2, tokens=12)  # ... but not the log
    third = throttle.acquire(1, priority=INTERACTIVE)
    assert first.at_ms + 1500 <= third.at_ms <= first.at_ms + 1500 + LATE_MS
    assert 1300 < r.pttl(throttle_log_key(BUCKET)) <= 1500


# --- keys and round trips -------------------------------------------------------------


def test_the_total_is_the_tokens_of_the_log_after_every_script(r: CountingRedis) -> None:
    """No script reads the whole log: each keeps the total of its tokens instead. After
    every kind of change (admitted, admitted again late, settled, given back, priced
    again, left the window, the total lost and seeded), it is the log's sum."""
    late_ms = 50

    def check() -> None:
        total = r.get(throttle_total_key(BUCKET))
        assert total is not None
        logged = costs(r)
        assert int(total) == sum(logged[m] for m in members(r)), (total, logged)

    throttle = make(r, rpm=50, tpm=100_000, window_s=1.0, late_start_ms=late_ms)
    a = throttle.acquire(100, priority=INTERACTIVE)
    b = throttle.acquire(200, priority=INTERACTIVE)
    check()
    throttle.settle(a, 40)
    check()
    throttle.release(b)
    check()
    price = [300]
    c = throttle.acquire(lambda: price[0], priority=INTERACTIVE)
    price[0] = 250
    throttle.reprice()
    check()
    time.sleep((late_ms + 20) / 1000)
    c = throttle.starting(c)  # late: admitted again
    check()
    time.sleep((late_ms + 20) / 1000)
    throttle.starting(c, sent=True)  # its bytes went out late: moved
    check()
    time.sleep(1.1)  # everything leaves the window
    throttle.acquire(7, priority=INTERACTIVE)
    check()
    assert int(r.get(throttle_total_key(BUCKET)) or 0) == 7
    r.delete(throttle_total_key(BUCKET))  # lost: seeded again, over the log that is left
    throttle.acquire(5, priority=INTERACTIVE)
    check()


def test_keys_expire_a_window_after_the_last_admission(r: CountingRedis) -> None:
    read = 0

    def seed() -> list[tuple[float, int]]:
        nonlocal read
        read += 1
        return []

    throttle = make(r, rpm=5, tpm=1000, window_s=1.0, seed=seed)
    keys = {
        name: key(BUCKET)
        for name, key in [
            ("log", throttle_log_key),
            ("costs", throttle_costs_key),
            ("total", throttle_total_key),
            ("pace", throttle_pace_key),
            ("pause", throttle_pause_key),
            ("room", throttle_room_key),
        ]
    }
    ours = throttle.acquire(3)
    throttle.observe(ours, 0, None)  # the others use 5 - 0 - 1 = 4 requests: a room
    throttle.pause(0.3)
    ttl = {name: int(r.pttl(key)) for name, key in keys.items()}
    for name in ("log", "costs", "total", "pace"):
        assert 800 < ttl[name] <= 1000, (name, ttl)
    assert 0 < ttl["pause"] <= 300
    assert ROOM_KEEP_WINDOWS * 1000 - 200 < ttl["room"] <= ROOM_KEEP_WINDOWS * 1000
    time.sleep(0.6)
    throttle.acquire(1, priority=INTERACTIVE)  # renews them: it takes a turn too
    for name in ("log", "costs", "total", "pace"):
        assert 800 < r.pttl(keys[name]) <= 1000, name
    assert r.pttl(keys["pause"]) == -2  # gone with the pause
    time.sleep(1.1)
    assert [name for name, key in keys.items() if r.exists(key)] == ["room"]
    assert read == 1
    throttle.acquire(1, max_wait=0)  # idle for a window: the log is read from the ledger
    assert read == 2


@pytest.mark.parametrize("priority", [BULK, INTERACTIVE], ids=["bulk", "interactive"])
def test_round_trips_per_admitted_call_stay_small(redis_url: str, priority: Priority) -> None:
    """20 threads of one process contend for 40 calls a second. Each admitted call costs
    one script call that says how long to wait, one that admits it and one settle: the
    waiting threads queue behind the one asking, so they cost nothing. Without that, each
    turn would cost a call per waiting thread."""
    client = counting_client(redis_url)
    try:
        throttle = make(client, rpm=40, tpm=100_000, window_s=1.0)
        throttle.release(throttle.acquire(0))  # loads the scripts, logs the empty history
        trips, sent, admitted = throttle.stats().redis_round_trips, client.sent, 1
        stop = threading.Event()

        def call() -> int:
            calls = 0
            while True:
                try:
                    admission = throttle.acquire(1, stop=stop, priority=priority)
                except ThrottleInterrupted:
                    return calls
                throttle.settle(admission, 1)
                calls += 1

        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(call) for _ in range(20)]
            time.sleep(2.5)
            stop.set()
            settled = sum(f.result(timeout=10) for f in futures)
        stats = throttle.stats()
        trips = stats.redis_round_trips - trips
        admitted = stats.admitted - admitted
    finally:
        client.close()
    assert trips == client.sent - sent  # the throttle's own count agrees with the client's
    assert admitted == settled
    assert admitted >= 60  # 2.5 s at 40 a second, a first window of them at once if unpaced
    # Per call: ask, ask again, settle (measured: exactly that for bulk, 2.1 for
    # interactive, whose first window needs no second ask), plus the asking thread's
    # last ask when stopped; a tenth more for a wake-up Redis's clock sees a ms early.
    assert trips <= 3.1 * admitted + 1, (trips, admitted)
    print(f"\n{priority.name}: {admitted} admitted, {trips} round trips")
