"""Bulk requests book only when their slot is near, priced afresh, against real Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobs.models import Priority
from tests.integration.throttle_helpers import (
    Admitted,
    CountingRedis,
    admitted,
    entries,
    log_size,
    make,
    members,
    overfull_future_windows,
    redis_now_ms,
    released_early,
    wait_until,
    worst_window,
)
from worker.throttle import RequestTooLarge, ThrottleInterrupted, ThrottleTimeout

pytestmark = pytest.mark.integration

WINDOW_S, HORIZON_S = 2.0, 0.3
WINDOW_MS, HORIZON_MS = int(WINDOW_S * 1000), int(HORIZON_S * 1000)


def test_a_far_slot_is_not_booked_until_it_is_near(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=10**6, window_s=WINDOW_S, booking_horizon_s=HORIZON_S)
    first = throttle.acquire(1)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(throttle.acquire, 1)
        time.sleep(0.5)
        # A window away: the log holds the first call only, nothing for the sleeper.
        assert set(members(r)) == {f"{first.id}:1"}
        wait_until(lambda: log_size(r) == 2, timeout=WINDOW_S)
        booked_at = redis_now_ms(r)
        assert first.start_ms + WINDOW_MS - HORIZON_MS - 50 <= booked_at
        granted = second.result(timeout=5)
    assert granted.start_ms == first.start_ms + WINDOW_MS


def test_the_price_is_taken_when_the_slot_is_booked(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=10**6, window_s=WINDOW_S, booking_horizon_s=HORIZON_S)
    throttle.acquire(1)
    prices = iter([900, 500])
    granted = throttle.acquire(lambda: next(prices))
    # Priced once when it first looked, and again when it booked.
    assert granted.tokens == 500
    assert members(r)[f"{granted.id}:500"] == granted.start_ms


def test_interactive_requests_book_at_once(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=10**6, window_s=WINDOW_S, booking_horizon_s=HORIZON_S)
    first = throttle.acquire(1)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(throttle.acquire, 1, priority=Priority.INTERACTIVE)
        wait_until(lambda: log_size(r) == 2)
        assert waiting.result(timeout=5).start_ms == first.start_ms + WINDOW_MS


@pytest.mark.parametrize(("settled", "fits"), [(500, True), (900, False)])
def test_tokens_settled_below_the_reservation_wake_an_unbooked_sleeper(
    r: CountingRedis, settled: int, fits: bool
) -> None:
    tpm = 1000
    throttle = make(r, rpm=100, tpm=tpm, window_s=WINDOW_S, booking_horizon_s=HORIZON_S)
    full = throttle.acquire(tpm)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(throttle.acquire, 400)
        time.sleep(0.2)
        assert log_size(r) == 1  # asleep, unbooked, until a window from now
        throttle.settle(full, settled)
        time.sleep(0.2)
        # Room for 400 came free: the sleeper woke and booked it, in this window.
        # Too little: it looked, and sleeps again until the window rolls.
        assert log_size(r) == (2 if fits else 1)
        granted = waiting.result(timeout=5)
    if fits:
        assert granted.start_ms < full.start_ms + WINDOW_MS - HORIZON_MS
    else:
        assert granted.start_ms == full.start_ms + WINDOW_MS
    assert not overfull_future_windows(entries(r), now_ms=0, window_ms=WINDOW_MS, rpm=100, tpm=tpm)


def test_stop_ends_an_unbooked_sleep(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=10**6, window_s=10.0, booking_horizon_s=HORIZON_S)
    throttle.acquire(1)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(throttle.acquire, 1, stop=stop)
        time.sleep(0.2)
        stop.set()
        started = time.monotonic()
        with pytest.raises(ThrottleInterrupted):
            waiting.result(timeout=5)
    assert time.monotonic() - started < 2.0
    assert log_size(r) == 1


def test_limits_hold_while_sleepers_book_late(r: CountingRedis) -> None:
    rpm, tpm = 4, 1000
    throttle = make(r, rpm=rpm, tpm=tpm, window_s=WINDOW_S, booking_horizon_s=HORIZON_S)

    def take(i: int) -> tuple[str, Admitted]:
        reservation = throttle.acquire(100 + 50 * (i % 4))
        return reservation.id, admitted(reservation)

    with ThreadPoolExecutor(12) as pool:
        granted = list(pool.map(take, range(12)))
    assert len({rid for rid, _ in granted}) == 12
    records = [record for _, record in granted]
    # The slots granted keep both limits in every window, and no caller went before its
    # slot: its calls reach the provider within the limits too.
    requests, tokens = worst_window(records, WINDOW_MS)
    assert requests <= rpm and tokens <= tpm, (requests, tokens)
    assert not released_early(records)
    assert not overfull_future_windows(entries(r), now_ms=0, window_ms=WINDOW_MS, rpm=rpm, tpm=tpm)


def test_max_wait_and_oversize_still_apply(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=1000, window_s=WINDOW_S, booking_horizon_s=HORIZON_S)
    throttle.acquire(1)
    with pytest.raises(ThrottleTimeout):
        throttle.acquire(1, max_wait=1.0)
    prices = iter([10, 2000])
    with pytest.raises(RequestTooLarge):
        throttle.acquire(lambda: next(prices))
    assert log_size(r) == 1


def test_unbooked_sleepers_take_turns_instead_of_all_waking(r: CountingRedis) -> None:
    # Every sleeper projects the same next free slot. When each woke for it, all but
    # the first few found it taken, window after window: 8.1 commands per admission
    # here. In line, the first books and wakes the next, and one sleeper looks in vain
    # per window: one place on arrival, about one on its turn, a confirm and a settle.
    rpm, count = 4, 24
    throttle = make(r, rpm=rpm, tpm=10**6, window_s=1.0, booking_horizon_s=0.2)
    throttle.release(throttle.acquire(1))  # initialises the bucket
    sent = r.sent

    def call(_: int) -> Admitted:
        reservation = throttle.acquire(1)
        record = admitted(reservation)
        throttle.settle(reservation, 1)  # no refund: nothing wakes early
        return record

    with ThreadPoolExecutor(count) as pool:
        records = list(pool.map(call, range(count)))
    per_admission = (r.sent - sent) / count
    print(f"\nRedis commands per admission with {count} sleepers: {per_admission:.2f}")
    assert per_admission <= 5.0
    # Still a full window at each roll, never more, and no caller went before its slot.
    starts = [a.start_ms for a in records]
    assert max(starts) - min(starts) < (count // rpm) * 1000 + 500
    assert worst_window(records, 1000)[0] <= rpm
    assert not released_early(records)
    assert not overfull_future_windows(entries(r), now_ms=0, window_ms=1000, rpm=rpm, tpm=10**6)
