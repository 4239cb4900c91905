"""A call that starts late moves its entry to when it really starts, against real Redis."""

from __future__ import annotations

import time

import pytest

from tests.integration.throttle_helpers import (
    CountingRedis,
    entries,
    make,
    members,
    overfull_future_windows,
    redis_now_ms,
)
from worker.throttle import LATE_START_MS

pytestmark = pytest.mark.integration

RPM, TPM, WINDOW_S = 2, 10**6, 2.0
WINDOW_MS = int(WINDOW_S * 1000)


def test_a_call_on_time_costs_no_round_trip(r: CountingRedis) -> None:
    throttle = make(r, rpm=RPM, tpm=TPM, window_s=WINDOW_S)
    granted = throttle.acquire(1)
    sent = r.sent
    assert throttle.starting(granted) == granted
    assert r.sent == sent


def test_a_late_call_moves_and_pushes_the_next_window_back(r: CountingRedis) -> None:
    throttle = make(r, rpm=1, tpm=TPM, window_s=WINDOW_S)
    first = throttle.acquire(1)
    # The next one waits for the window to roll past the first: book it, don't wait.
    booked = throttle._store.reserve("b.next", 1, rpm=1, tpm=TPM, max_wait_ms=10**6)
    assert booked.slot_ms == first.start_ms + WINDOW_MS
    time.sleep(3 * LATE_START_MS / 1000)  # the ledger row took this long
    moved = throttle.starting(first)
    now = redis_now_ms(r)
    assert first.start_ms + 3 * LATE_START_MS <= moved.start_ms <= now
    log = members(r)
    assert log[f"{first.id}:1"] == moved.start_ms
    # Sent at its old slot, the next call would land inside this one's window.
    assert log["b.next:1"] == moved.start_ms + WINDOW_MS
    assert not overfull_future_windows(entries(r), now_ms=0, window_ms=WINDOW_MS, rpm=1, tpm=TPM)
    # Settling and releasing find the entry at its new slot.
    throttle.settle(moved, 0)
    assert members(r)[f"{first.id}:0"] == moved.start_ms
    throttle.release(moved)
    assert set(members(r)) == {"b.next:1"}


def test_an_entry_already_gone_is_left_alone(r: CountingRedis) -> None:
    throttle = make(r, rpm=RPM, tpm=TPM, window_s=WINDOW_S)
    granted = throttle.acquire(1)
    throttle.release(granted)
    time.sleep(2 * LATE_START_MS / 1000)
    assert throttle.starting(granted) == granted
    assert members(r) == {}


def test_bulk_moved_by_a_late_start_keeps_the_interactive_reserve(r: CountingRedis) -> None:
    rpm, reserve = 5, 1
    throttle = make(r, rpm=rpm, tpm=TPM, window_s=WINDOW_S, interactive_reserve=reserve)
    first = throttle.acquire(1)
    for i in range(rpm - reserve * 2 + rpm - reserve):  # the rest of this window, the next
        throttle._store.reserve(
            f"b.{i}", 1, rpm=rpm, tpm=TPM, max_wait_ms=10**6,
            interactive_cap=throttle._cap, interactive_reserve=reserve,
        )  # fmt: skip
    booked = entries(r)
    assert not overfull_future_windows(
        booked, now_ms=0, window_ms=WINDOW_MS, rpm=rpm - reserve, tpm=TPM
    )
    time.sleep(3 * LATE_START_MS / 1000)
    throttle.starting(first)
    # The late entry now shares a window with the next window's bookings: one of them
    # moves, and the reserve stays free in every window, as when they were booked.
    moved = entries(r)
    assert not overfull_future_windows(
        moved, now_ms=0, window_ms=WINDOW_MS, rpm=rpm - reserve, tpm=TPM
    )
