"""Interactive requests ahead of waiting bulk ones, within their share, against real Redis."""

from __future__ import annotations

import dataclasses
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobs.constants import (
    throttle_init_key,
    throttle_interactive_key,
    throttle_log_key,
    throttle_pause_key,
)
from jobs.models import Priority
from tests.integration.throttle_helpers import (
    BUCKET,
    Admitted,
    CountingRedis,
    admitted,
    entries,
    log_size,
    make,
    members,
    most_interactive,
    overfull_future_windows,
    random_schedule,
    redis_now_ms,
    released_early,
    wait_until,
    worst_window,
    write_log,
)
from worker.throttle import ThrottleInterrupted
from worker.throttle_reference import (
    earliest_slot,
    interactive_hold,
    interactive_slot,
    stored_kind,
)
from worker.throttle_store import InitMode, ThrottleStore

pytestmark = pytest.mark.integration

INTERACTIVE, BULK = int(Priority.INTERACTIVE), int(Priority.BULK)


def book(store: ThrottleStore, rid: str, *, rpm: int, tpm: int, cap: int, cost: int = 1) -> int:
    """Reserve without waiting (as a sleeper would before its sleep); return the slot."""
    decision = store.reserve(
        rid, cost, rpm=rpm, tpm=tpm, max_wait_ms=10**9, interactive_cap=cap, init=InitMode.SEED
    )
    assert decision.admitted
    return decision.slot_ms


def test_lua_matches_reference(r: CountingRedis) -> None:
    rng = random.Random(20260301)
    log_key, pause_key = throttle_log_key(BUCKET), throttle_pause_key(BUCKET)
    history_key = throttle_interactive_key(BUCKET)
    takeovers = holds = 0
    for case in range(400):
        r.delete(log_key, pause_key, throttle_init_key(BUCKET), history_key)
        window_ms = rng.choice([50, 700, 5000])
        rpm, tpm = rng.randint(1, 10), rng.randint(10, 2000)
        cap = rng.randint(0, rpm)
        now = redis_now_ms(r)
        log = random_schedule(
            rng,
            now_ms=now,
            window_ms=window_ms,
            rpm=rpm,
            tpm=tpm,
            kinds=["b.", "b.", "i.", "w.", "x.", "s."],
        )
        write_log(r, log)
        history = [
            (now - rng.randint(0, 6 * window_ms), rng.randint(0, tpm))
            for _ in range(rng.choice([0, 0, 1, 3, 12]))
        ]
        for i, (score, tokens) in enumerate(history):
            r.zadd(history_key, {f"i.h{i}:{tokens}": score})
        pause_until = 0
        if rng.random() < 0.2:
            pause_until = now + rng.randint(1, 2 * window_ms)
            r.set(pause_key, pause_until, px=pause_until - now)
        cost = rng.randint(0, tpm)
        kind = rng.choice(["i.", "b."])
        reserve = rng.choice([0, 0, 1, 3])
        store = ThrottleStore(r, BUCKET, window_ms=window_ms)
        decision = store.reserve(
            f"{kind}new", cost, rpm=rpm, tpm=tpm, max_wait_ms=10**9, interactive_cap=cap,
            interactive_reserve=reserve, init=InitMode.SEED,
        )  # fmt: skip
        assert decision.admitted
        common = {"now_ms": decision.now_ms, "pause_until_ms": pause_until, "window_ms": window_ms}
        hold = interactive_hold(
            history, now_ms=decision.now_ms, window_ms=window_ms, rpm=rpm, tpm=tpm, cap=cap,
            reserve=reserve,
        )  # fmt: skip
        holds += hold != (0, 0)
        after = members(r)
        if kind == "b.":
            expected = earliest_slot(
                log, **common, rpm=rpm, tpm=tpm, cost=cost, hold_requests=hold[0],
                hold_tokens=hold[1],
            )  # fmt: skip
            assert decision.slot_ms == after[f"b.new:{cost}"] == expected, f"case {case}"
            continue
        expected, displaced = interactive_slot(log, **common, rpm=rpm, tpm=tpm, cap=cap, cost=cost)
        assert decision.slot_ms == expected, f"case {case}"
        # Logged as waited when its slot is not now: it then leaves the hold alone.
        assert after[f"{stored_kind(expected, decision.now_ms)}new:{cost}"] == expected
        # Logged in the history, which decides the hold of later bulk requests.
        assert r.zscore(history_key, f"i.new:{cost}") == decision.now_ms
        if displaced is not None:
            takeovers += 1
            # The displaced entry went to the end of the queue, as a new bulk request would.
            rest = [e for e in log if e[2] != displaced and e[0] > decision.now_ms - window_ms]
            moved = earliest_slot(
                [*rest, (expected, cost, f"{stored_kind(expected, decision.now_ms)}new:{cost}")],
                **common,
                rpm=rpm,
                tpm=tpm,
                cost=int(displaced.rsplit(":", 1)[1]),
                hold_requests=hold[0],
                hold_tokens=hold[1],
            )
            assert after[displaced] == moved, f"case {case}"
        assert not overfull_future_windows(
            entries(r), now_ms=decision.now_ms, window_ms=window_ms, rpm=rpm, tpm=tpm
        ), f"case {case}"
    assert takeovers >= 20  # the random logs exercised the takeover path
    assert holds >= 100  # and bulk holds


def test_interactive_takes_the_earliest_booked_bulk_slot(r: CountingRedis) -> None:
    rpm, tpm, window_ms, cap = 5, 10**6, 2000, 2
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    for i in range(15):  # five start now; ten wait one and two windows
        book(store, f"b.{i:02d}", rpm=rpm, tpm=tpm, cap=cap)
    before = members(r)
    tail = max(before.values())
    now = redis_now_ms(r)
    waiting = sorted((score, m) for m, score in before.items() if score > now)
    assert len(waiting) == 10
    slot = book(store, "i.first", rpm=rpm, tpm=tpm, cap=cap)
    assert slot == waiting[0][0]  # the very next slot, not the end of the queue
    after = members(r)
    displaced = waiting[0][1]
    assert after[displaced] > tail  # moved to the end of the queue
    assert len(after) == 16
    assert after["w.first:1"] == slot  # logged as an interactive request that waited
    # Everybody else kept their slot.
    assert {m: s for m, s in after.items() if m not in (displaced, "w.first:1")} == {
        m: s for m, s in before.items() if m != displaced
    }
    assert not overfull_future_windows(
        entries(r), now_ms=now, window_ms=window_ms, rpm=rpm, tpm=tpm
    )


def test_bulk_leaves_room_for_interactive_traffic_it_has_seen(r: CountingRedis) -> None:
    rpm, tpm, window_ms, cap = 10, 10**6, 2000, 5
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    book(store, "i.seen", rpm=rpm, tpm=tpm, cap=cap)
    for i in range(30):  # a backlog three windows deep
        book(store, f"b.{i:02d}", rpm=rpm, tpm=tpm, cap=cap)
    before = members(r)
    now = redis_now_ms(r)
    assert sum(1 for s in before.values() if s > now) >= 10  # bulk is waiting
    # The hold (3 of each window) is there: the next interactive requests start at
    # once, and no bulk reservation moves.
    for n in range(2):
        decision = store.reserve(
            f"i.next{n}", 1, rpm=rpm, tpm=tpm, max_wait_ms=10**9, interactive_cap=cap
        )
        assert decision.slot_ms == decision.now_ms
    after = members(r)
    assert {m: after[m] for m in before} == before
    assert not overfull_future_windows(
        entries(r), now_ms=now, window_ms=window_ms, rpm=rpm, tpm=tpm
    )


def test_interactive_backlog_at_a_roll_leaves_the_hold_to_new_arrivals(
    r: CountingRedis,
) -> None:
    rpm, tpm, window_ms, cap = 10, 10**6, 2000, 5
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    for i in range(10):  # the window is full from now on
        book(store, f"b.{i:02d}", rpm=rpm, tpm=tpm, cap=cap)
    # Two interactive requests arrive while it is full: they wait for the roll.
    early = [book(store, f"i.early{n}", rpm=rpm, tpm=tpm, cap=cap) for n in range(2)]
    assert min(early) > redis_now_ms(r)
    for i in range(10, 30):  # the backlog books the windows after it
        book(store, f"b.{i:02d}", rpm=rpm, tpm=tpm, cap=cap)
    log = entries(r)
    assert {m for _, _, m in log if not m.startswith("b.")} == {"w.early0:1", "w.early1:1"}
    # Two seen in the last window: bulk holds ceil(1.25 * 2) + 1 = 4 back. The two
    # that waited took bulk's place at the roll, so the hold is still whole there:
    # no window holds more than 10 - 4 entries once the roll has come.
    now = redis_now_ms(r)
    hold, _ = interactive_hold(
        [(now, 1), (now, 1)], now_ms=now, window_ms=window_ms, rpm=rpm, tpm=tpm, cap=cap
    )
    assert hold == 4
    after_roll = [score for score, _, _ in log if score >= min(early)]
    assert (
        max(sum(1 for score in after_roll if end - window_ms < score <= end) for end in after_roll)
        == rpm - hold
    )
    # So four new arrivals after the roll start at once.
    while redis_now_ms(r) <= max(early) + 50:
        time.sleep(0.02)
    for n in range(4):
        decision = store.reserve(
            f"i.late{n}", 1, rpm=rpm, tpm=tpm, max_wait_ms=10**9, interactive_cap=cap
        )
        assert decision.slot_ms == decision.now_ms, f"arrival {n}"


def test_a_reserve_holds_room_before_any_interactive_request(r: CountingRedis) -> None:
    rpm, tpm, window_ms, cap = 10, 10**6, 2000, 5
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    for i in range(30):
        decision = store.reserve(
            f"b.{i:02d}", 1, rpm=rpm, tpm=tpm, max_wait_ms=10**9, interactive_cap=cap,
            interactive_reserve=2, init=InitMode.SEED,
        )  # fmt: skip
        assert decision.admitted
    slots = sorted(members(r).values())
    now = redis_now_ms(r)
    assert slots[7] <= now < slots[8]  # eight a window: two held back
    first = store.reserve("i.first", 1, rpm=rpm, tpm=tpm, max_wait_ms=10**9, interactive_cap=cap)
    assert first.slot_ms == first.now_ms


def test_without_interactive_history_bulk_takes_every_slot(r: CountingRedis) -> None:
    rpm, tpm, window_ms, cap = 10, 10**6, 2000, 5
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    for i in range(30):
        book(store, f"b.{i:02d}", rpm=rpm, tpm=tpm, cap=cap)
    now = redis_now_ms(r)
    slots = sorted(members(r).values())
    # Ten a window, back to back: nothing held back.
    assert slots[9] <= now and slots[10] > now and slots[20] - slots[10] == window_ms


def test_interactive_share_caps_takeovers(r: CountingRedis) -> None:
    rpm, tpm, window_ms, cap = 6, 10**6, 2000, 2  # interactive_share = 1/3
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    for i in range(24):
        book(store, f"b.{i:02d}", rpm=rpm, tpm=tpm, cap=cap)
    booked = set(members(r).values())
    now = redis_now_ms(r)
    slots = [book(store, f"i.{i}", rpm=rpm, tpm=tpm, cap=cap) for i in range(5)]
    log = entries(r)
    assert slots == sorted(slots)  # first come, first served among interactive ones
    assert all(slot in booked for slot in slots[:4])  # these took bulk slots over
    assert most_interactive(log, window_ms) <= cap
    # The third could not join the first two in their window: bulk keeps the rest of it.
    assert slots[2] >= slots[0] + window_ms
    # Takeovers are only looked for within two windows; beyond, the end of the queue.
    assert slots[4] > max(booked)
    assert not overfull_future_windows(log, now_ms=now, window_ms=window_ms, rpm=rpm, tpm=tpm)


def test_interactive_larger_than_the_bulk_slot_respects_tpm(r: CountingRedis) -> None:
    rpm, tpm, window_ms, cap = 100, 100, 2000, 50
    store = ThrottleStore(r, BUCKET, window_ms=window_ms)
    book(store, "b.0", rpm=rpm, tpm=tpm, cap=cap, cost=100)  # fills the window now
    small = book(store, "b.1", rpm=rpm, tpm=tpm, cap=cap, cost=10)
    big = book(store, "b.2", rpm=rpm, tpm=tpm, cap=cap, cost=90)
    assert small == big  # both wait for the first to leave the window
    now = redis_now_ms(r)
    # 50 tokens do not fit in place of the 10-token reservation (50 + 90 > 100), but
    # they do in place of the 90-token one.
    slot = book(store, "i.x", rpm=rpm, tpm=tpm, cap=cap, cost=50)
    assert slot == big
    after = members(r)
    assert after["b.1:10"] == small
    assert after["b.2:90"] > big
    assert not overfull_future_windows(
        entries(r), now_ms=now, window_ms=window_ms, rpm=rpm, tpm=tpm
    )


def test_stop_releases_a_displaced_reservation(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=2.0, interactive_share=1.0)
    first = throttle.acquire(1, max_wait=0)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(throttle.acquire, 1, stop=stop)
        wait_until(lambda: log_size(r) == 2)
        store = ThrottleStore(r, BUCKET, window_ms=2000)
        book(store, "i.jump", rpm=1, tpm=1000, cap=1)  # moves the sleeper out of its slot
        stop.set()
        with pytest.raises(ThrottleInterrupted):
            waiting.result(timeout=10)
    # The moved entry was found and removed, not left to block the queue.
    assert set(members(r)) == {f"{first.id}:1", "w.jump:1"}


def test_a_waited_interactive_reservation_is_confirmed_settled_and_released(
    r: CountingRedis,
) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=1.0)
    throttle.acquire(1, max_wait=0)
    # The window is full: the interactive request waits for the roll, logged as w.
    waited = throttle.acquire(10, priority=INTERACTIVE)
    name = waited.id.removeprefix("i.")
    assert waited.id.startswith("i.")
    assert members(r)[f"w.{name}:10"] == waited.start_ms
    throttle.settle(waited, 4)  # its callers know it by its i. id
    assert members(r)[f"w.{name}:4"] == waited.start_ms
    # Found by its tokens even where the slot it knows is stale (a move it missed).
    throttle.release(dataclasses.replace(waited, tokens=4, start_ms=waited.start_ms - 1))
    assert not any(name in m for m in members(r))


def test_interactive_starts_ahead_of_a_hundred_booked_bulk_calls(r: CountingRedis) -> None:
    rpm, window_s = 50, 1.0
    throttle = make(r, rpm=rpm, tpm=10**6, window_s=window_s)
    bulk: list[Admitted] = []
    with ThreadPoolExecutor(100) as pool:
        futures = [pool.submit(lambda: admitted(throttle.acquire(1))) for _ in range(100)]
        wait_until(lambda: log_size(r) == 100)
        now = redis_now_ms(r)
        booked = sorted(s for m, s in members(r).items() if s > now)
        assert len(booked) >= 40  # a window's worth of bulk calls is waiting
        called = time.monotonic()
        interactive = admitted(throttle.acquire(1, priority=INTERACTIVE))
        waited = time.monotonic() - called
        bulk = [f.result(timeout=30) for f in futures]
    waiting_bulk = [b.start_ms for b in bulk if b.start_ms > now]
    print(
        f"\ninteractive waited {waited:.2f} s for slot +{interactive.start_ms - now} ms, "
        f"ahead of {len(waiting_bulk)} bulk calls booked before it"
    )
    assert interactive.start_ms < booked[-1]
    # It jumped the whole waiting queue: no bulk call booked before it started earlier.
    assert min(waiting_bulk) >= interactive.start_ms
    records = [*bulk, interactive]
    assert worst_window(records, int(window_s * 1000))[0] <= rpm
    assert not released_early(records)


def test_mixed_priorities_never_over_admit_and_bulk_progresses(r: CountingRedis) -> None:
    rpm, tpm, window_ms, share = 20, 10**6, 1000, 0.5
    throttle = make(r, rpm=rpm, tpm=tpm, window_s=window_ms / 1000, interactive_share=share)
    throttle.release(throttle.acquire(0))
    stop = threading.Event()
    threads = 40
    # 4 interactive callers among 40, all asking at once, each again as soon as it is let go.
    priorities = [INTERACTIVE if n % 10 == 0 else BULK for n in range(threads)]
    start = threading.Barrier(threads)
    records: list[tuple[Admitted, int]] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        rng = random.Random(n)
        start.wait(30)
        while not stop.is_set():
            try:
                reservation = throttle.acquire(
                    rng.randint(1, 50), stop=stop, priority=priorities[n]
                )
                record = admitted(reservation)
            except ThrottleInterrupted:
                return
            with lock:
                records.append((record, n))

    sent = r.sent
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run, n) for n in range(threads)]
        time.sleep(3.0)
        stop.set()
        for future in futures:
            future.result(timeout=30)
    sent = r.sent - sent
    admissions = [record for record, _ in records]
    requests, tokens = worst_window(admissions, window_ms)
    assert requests <= rpm
    assert tokens <= tpm
    assert not released_early(admissions)
    # Each caller's admissions: every one asks again as soon as it is let go, so the
    # counts show who went ahead, whatever the machine's speed (wall-clock waits do not).
    let_go = Counter(n for _, n in records)
    counts = {
        p: [let_go[n] for n in range(threads) if priorities[n] == p] for p in (INTERACTIVE, BULK)
    }
    interactive, bulk = (statistics.mean(counts[p]) for p in (INTERACTIVE, BULK))
    starts = sorted(record.start_ms for record in admissions)
    windows = (starts[-1] - starts[0]) // window_ms
    print(
        f"\nmixed: admitted per interactive caller {sorted(counts[INTERACTIVE])}, "
        f"per bulk caller {bulk:.2f} on average (most {max(counts[BULK])}), "
        f"worst window={requests}, commands per admitted call={sent / len(records):.2f}"
    )
    # Interactive callers go ahead of waiting bulk ones: let go 7 to 13 times as often
    # in three runs, 0.6 to 1.4 times with the throttle treating them as bulk.
    assert interactive >= 3 * bulk, counts
    # Bulk still fills what interactive leaves of every window.
    assert sum(counts[BULK]) >= (rpm - int(share * rpm)) * (windows - 1)
    assert sent <= 4 * len(records) + 2 * threads
