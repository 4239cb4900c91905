"""Learning somebody else's use of the key from the provider's rate-limit headers."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobs.constants import throttle_init_key, throttle_interactive_key, throttle_log_key
from tests.integration.throttle_helpers import (
    BUCKET,
    CountingRedis,
    entries,
    log_size,
    make,
    members,
    overfull_future_windows,
    random_schedule,
    redis_now_ms,
    wait_until,
    write_log,
)
from worker.throttle import ExternalUsage, ThrottleTimeout, WindowUsage
from worker.throttle_store import InitMode, ThrottleStore

pytestmark = pytest.mark.integration


def phantoms(client: CountingRedis) -> dict[str, int]:
    return {m: s for m, s in members(client).items() if m.startswith("x.")}


def test_outside_requests_push_the_next_slots_out(r: CountingRedis) -> None:
    rpm = 10
    # No interactive share, so no hold: the phantoms alone (the hold is tested below).
    throttle = make(r, rpm=rpm, tpm=10**6, window_s=2.0, interactive_share=0.0)
    throttle.release(throttle.acquire(0))  # initialises the bucket
    before = redis_now_ms(r)
    # Somebody else made 6 calls: the provider has 4 left; the slack (1) is forgiven.
    added = throttle.observe(4, None, 1.0, None)
    assert added == ExternalUsage(requests=5, tokens=0)
    scores = set(phantoms(r).values())
    assert len(scores) == 1
    (score,) = scores
    # They leave our window when the provider says its window resets: in 1 s.
    assert before - 1000 <= score <= redis_now_ms(r) - 1000
    assert throttle.usage() == WindowUsage(requests=5, tokens=0, external_requests=5)
    for _ in range(rpm - 5):
        throttle.acquire(1, max_wait=0)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0)
    nxt = throttle.acquire(1, max_wait=3)
    assert nxt.start_ms == score + 2000


def test_repeated_observations_do_not_compound(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=1000, window_s=2.0)
    ours = [throttle.acquire(50, max_wait=0) for _ in range(2)]
    first = throttle.observe(3, 300, 1.5, 1.5)
    # Requests: 10 - 3 - 1 slack - 2 ours = 4; tokens: 1000 - 300 - 20 slack - 100 = 580.
    assert first == ExternalUsage(requests=4, tokens=580)
    for _ in range(3):
        assert throttle.observe(3, 300, 1.5, 1.5) == ExternalUsage(requests=0, tokens=0)
    usage = throttle.usage()
    assert (usage.external_requests, usage.external_tokens) == (4, 580)
    # More remaining than our own window implies never removes anything.
    assert throttle.observe(10, 1000, 1.0, 1.0) == ExternalUsage(requests=0, tokens=0)
    assert throttle.usage() == usage
    assert all(f"{o.id}:50" in members(r) for o in ours)
    # A lower level is topped up only by the difference.
    assert throttle.observe(1, None, 1.5, None) == ExternalUsage(requests=2, tokens=0)
    assert throttle.usage().external_requests == 6


def test_outside_tokens_push_the_next_slots_out(r: CountingRedis) -> None:
    throttle = make(r, rpm=100, tpm=1000, window_s=1.0)
    throttle.release(throttle.acquire(0))
    assert throttle.observe(None, 400, None, 0.5) == ExternalUsage(requests=1, tokens=580)
    throttle.acquire(420, max_wait=0)  # exactly what is left of the window
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0)
    (score,) = phantoms(r).values()
    assert throttle.acquire(1, max_wait=2).start_ms == score + 1000


def test_nothing_to_learn_costs_no_redis_call(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=1000, window_s=1.0)
    throttle.release(throttle.acquire(0))
    sent = r.sent
    # Within the slack of the full limits: nobody else can be using the key.
    assert throttle.observe(9, 980, 60.0, 60.0) == ExternalUsage(requests=0, tokens=0)
    assert throttle.observe(None, None, None, None) == ExternalUsage(requests=0, tokens=0)
    assert r.sent == sent


def test_a_reset_window_adds_nothing(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=1000, window_s=1.0)
    throttle.release(throttle.acquire(0))
    assert throttle.observe(0, 0, 0.0, 0.0) == ExternalUsage(requests=0, tokens=0)
    assert log_size(r) == 0


def test_observe_on_a_lost_bucket_waits_for_the_seed(r: CountingRedis) -> None:
    throttle = make(r, rpm=10, tpm=1000, window_s=1.0)
    # No initialised marker: the seed will hold our own calls, the next response the rest.
    assert throttle.observe(0, 0, 1.0, 1.0) == ExternalUsage(requests=0, tokens=0)
    assert log_size(r) == 0
    assert r.exists(throttle_init_key(BUCKET)) == 0


def test_booked_sleepers_move_behind_outside_usage(r: CountingRedis) -> None:
    rpm, tpm, window_ms = 10, 100, 1000
    # No interactive share, so no hold: the phantoms alone (the hold is tested below).
    throttle = make(r, rpm=rpm, tpm=tpm, window_s=window_ms / 1000, interactive_share=0.0)
    start = throttle.acquire(100, max_wait=0)  # the window is full of tokens now
    with ThreadPoolExecutor(8) as pool:
        sleepers = [pool.submit(throttle.acquire, 10) for _ in range(8)]
        wait_until(lambda: log_size(r) == 9)
        booked = {m: s for m, s in members(r).items() if s > start.start_ms}
        assert set(booked.values()) == {start.start_ms + window_ms}
        time.sleep(0.3)
        # The provider says the key is nearly used up for a whole window: 9 outside
        # calls minus the slack of 1 leaves 8 phantoms, and only 2 booked calls fit
        # next to them when the first call leaves the window.
        assert throttle.observe(0, None, None, None) == ExternalUsage(requests=8, tokens=0)
        moved = members(r)
        (phantom,) = set(phantoms(r).values())
        kept = [m for m in booked if moved[m] == booked[m]]
        assert len(kept) == 2
        assert all(moved[m] == phantom + window_ms for m in booked if m not in kept)
        done = [s.result(timeout=10) for s in sleepers]
    assert sorted(d.start_ms for d in done) == sorted(moved[m] for m in booked)
    assert not overfull_future_windows(
        entries(r), now_ms=start.start_ms, window_ms=window_ms, rpm=rpm, tpm=tpm
    )


def test_observations_on_random_logs_keep_the_invariant(r: CountingRedis) -> None:
    rng = random.Random(424242)
    added_any = repeated = 0
    for case in range(120):
        r.delete(throttle_log_key(BUCKET), throttle_init_key(BUCKET))
        window_ms = rng.choice([300, 2000, 60_000])
        rpm, tpm = rng.randint(2, 12), rng.randint(20, 2000)
        now = redis_now_ms(r)
        log = random_schedule(
            rng, now_ms=now, window_ms=window_ms, rpm=rpm, tpm=tpm, kinds=["b.", "i.", "s."]
        )
        write_log(r, log)
        store = ThrottleStore(r, BUCKET, window_ms=window_ms)
        store.reserve("b.init", 0, rpm=rpm, tpm=tpm, max_wait_ms=-1, init=InitMode.SEED)
        before = members(r)
        kwargs = {
            "rpm": rpm,
            "tpm": tpm,
            "remaining_requests": rng.choice([None, rng.randint(0, rpm)]),
            "remaining_tokens": rng.choice([None, rng.randint(0, tpm)]),
            "reset_requests_ms": rng.choice([None, rng.randint(1, window_ms)]),
            "reset_tokens_ms": rng.choice([None, rng.randint(1, window_ms)]),
            "slack_requests": 1,
            "slack_tokens": 1,
        }
        first_ms = redis_now_ms(r)
        added = store.observe(f"p{case}", **kwargs)  # type: ignore[arg-type]
        after = members(r)
        seen = redis_now_ms(r)
        ours = {m: s for m, s in before.items() if s > seen - window_ms}
        # Nothing of ours was removed; started entries kept their time; booked ones only
        # moved later and kept their order.
        assert set(ours) <= set(after), f"case {case}"
        assert all(after[m] == s for m, s in ours.items() if s <= now), f"case {case}"
        assert all(after[m] >= s for m, s in ours.items()), f"case {case}"
        order = sorted(ours, key=lambda m: (ours[m], m))
        assert [after[m] for m in order] == sorted(after[m] for m in order), f"case {case}"
        new = {m for m in after if m.startswith("x.")}
        assert len(new) == added[0], f"case {case}"
        assert not overfull_future_windows(
            entries(r), now_ms=seen, window_ms=window_ms, rpm=rpm, tpm=tpm
        ), f"case {case}"
        again = store.observe(f"q{case}", **kwargs)  # type: ignore[arg-type]
        again_ms = redis_now_ms(r)
        # Repeating an observation adds nothing while the window holds the same entries.
        # An entry that left it in between (a 300 ms window on a slow machine) frees room
        # that the provider's figure, taken before, does not show: a new phantom is right.
        left = [m for m, s in after.items() if first_ms - window_ms < s <= again_ms - window_ms]
        if not left:
            assert again == (0, 0), f"case {case}"
            repeated += 1
        added_any += added[0] > 0
    assert added_any >= 30
    assert repeated >= 100


def test_concurrent_observers_do_not_double_count(r: CountingRedis) -> None:
    throttle = make(r, rpm=50, tpm=10**6, window_s=2.0)
    throttle.release(throttle.acquire(0))
    barrier = threading.Barrier(8)

    def observe() -> ExternalUsage:
        barrier.wait(timeout=10)
        return throttle.observe(20, None, 1.5, None)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: observe(), range(8)))
    # 50 - 20 - 1 slack = 29, added once in all.
    assert sum(res.requests for res in results) == 29
    assert throttle.usage().external_requests == 29


def test_bulk_moved_by_outside_usage_keeps_the_interactive_reserve(r: CountingRedis) -> None:
    rpm, reserve, window_ms = 10, 2, 2000
    throttle = make(r, rpm=rpm, tpm=10**6, window_s=window_ms / 1000, interactive_reserve=reserve)
    throttle.release(throttle.acquire(0))  # initialises the bucket
    for i in range(2 * (rpm - reserve)):  # this window and the next, less the reserve
        decision = throttle._store.reserve(
            f"b.{i:02d}", 1, rpm=rpm, tpm=10**6, max_wait_ms=10**6,
            interactive_cap=throttle._cap, interactive_reserve=reserve,
        )  # fmt: skip
        assert decision.admitted
    # The provider has nothing left for a whole window: our 8 calls, the slack of 1
    # and one outside call. Alone, the phantom would still let the next window's 8 fit.
    assert throttle.observe(0, None, None, None) == ExternalUsage(requests=1, tokens=0)
    log = entries(r)
    ours = [e for e in log if not e[2].startswith("x.")]
    # Bulk moved behind it still leaves the reserve free in every window to come.
    assert not overfull_future_windows(
        log, now_ms=redis_now_ms(r), window_ms=window_ms, rpm=rpm - reserve, tpm=10**6
    )
    assert len(ours) == 2 * (rpm - reserve)


def test_bulk_leaves_room_for_the_rate_of_other_clients(r: CountingRedis) -> None:
    rpm, window_ms = 10, 2000
    throttle = make(r, rpm=rpm, tpm=10**6, window_s=window_ms / 1000)  # cap: 5 a window
    throttle.release(throttle.acquire(0))  # initialises the bucket
    # Somebody else made 4 calls (less the slack of 1): three phantoms, also in the
    # history that sizes the hold: ceil(1.25 * 3) + 1 = 5 requests a window.
    assert throttle.observe(rpm - 4, None, None, None) == ExternalUsage(requests=3, tokens=0)
    assert r.zcard(throttle_interactive_key(BUCKET)) == 3
    for i in range(3 * rpm):
        throttle._store.reserve(
            f"b.{i:02d}", 1, rpm=rpm, tpm=10**6, max_wait_ms=10**6, interactive_cap=throttle._cap
        )
    log = entries(r)
    assert not overfull_future_windows(log, now_ms=0, window_ms=window_ms, rpm=rpm, tpm=10**6)
    # Beside the phantoms' window, bulk takes half of each window and leaves the rest.
    last = max(score for score, _, _ in log)
    latest = [m for score, _, m in log if last - window_ms < score <= last]
    assert len(latest) == rpm - 5


def test_a_refused_call_keeps_its_place_as_somebody_elses(r: CountingRedis) -> None:
    rpm, window_ms = 4, 2000
    throttle = make(r, rpm=rpm, tpm=10**6, window_s=window_ms / 1000)  # cap: 2 a window
    granted = [throttle.acquire(1, max_wait=0) for _ in range(rpm)]
    throttle.refused(granted[0])
    # Freeing the place would hand it out again, to be refused again: it stays taken.
    log = members(r)
    assert log[f"x.{granted[0].id[2:]}:1"] == granted[0].start_ms
    assert f"{granted[0].id}:1" not in log
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=0)
    # And the other client's rate (one call a window: a hold of ceil(1.25) + 1 = 3,
    # capped at half the window, 2) is left free in the windows to come.
    assert r.zcard(throttle_interactive_key(BUCKET)) == 1
    for i in range(6):
        throttle._store.reserve(
            f"b.{i}", 1, rpm=rpm, tpm=10**6, max_wait_ms=10**6, interactive_cap=throttle._cap
        )
    later = [e for e in entries(r) if e[0] > granted[-1].start_ms]
    assert len(later) == 6
    assert not overfull_future_windows(later, now_ms=0, window_ms=window_ms, rpm=rpm - 2, tpm=10**6)


def test_refusing_a_call_that_left_the_log_does_nothing(r: CountingRedis) -> None:
    throttle = make(r, rpm=4, tpm=10**6, window_s=2.0)
    granted = throttle.acquire(1)
    throttle.release(granted)
    throttle.refused(granted)
    assert members(r) == {}
