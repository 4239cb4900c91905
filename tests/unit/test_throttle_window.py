"""The reference slot computation against a brute-force reading of the sliding window."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.throttle import earliest_slot


def brute_force_slot(
    entries: list[tuple[int, int]],
    *,
    now_ms: int,
    pause_until_ms: int,
    window_ms: int,
    rpm: int,
    tpm: int,
    cost: int,
) -> int:
    """Try every millisecond from the earliest allowed start until the window fits."""
    floor = max([now_ms, pause_until_ms, *(score for score, _ in entries)])
    t = floor
    while True:
        inside = [tokens for score, tokens in entries if t - window_ms < score <= t]
        if len(inside) + 1 <= rpm and sum(inside) + cost <= tpm:
            return t
        t += 1


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    window_ms = draw(st.integers(1, 40))
    rpm = draw(st.integers(1, 6))
    tpm = draw(st.integers(1, 60))
    now_ms = draw(st.integers(100, 200))
    # Live entries only: the log never holds anything older than the window.
    scores = draw(st.lists(st.integers(now_ms - window_ms + 1, now_ms + 60), max_size=12))
    entries = [(score, draw(st.integers(0, tpm))) for score in sorted(scores)]
    pause_until_ms = draw(st.one_of(st.just(0), st.integers(now_ms - 10, now_ms + 80)))
    cost = draw(st.integers(0, tpm))
    return {
        "entries": entries,
        "now_ms": now_ms,
        "pause_until_ms": pause_until_ms,
        "window_ms": window_ms,
        "rpm": rpm,
        "tpm": tpm,
        "cost": cost,
    }


@settings(max_examples=400, deadline=None)
@given(cases())
def test_reference_matches_brute_force(case: dict[str, object]) -> None:
    assert earliest_slot(**case) == brute_force_slot(**case)  # type: ignore[arg-type]


def test_pruned_entries_do_not_count() -> None:
    # At now=60 with a 50 ms window the entry at 0 has left; the one at 20 has not.
    entries = [(0, 100), (20, 100)]
    common = {"now_ms": 60, "pause_until_ms": 0, "window_ms": 50, "rpm": 10, "tpm": 150}
    assert earliest_slot(entries, cost=50, **common) == 60
    assert earliest_slot(entries, cost=51, **common) == 70


def test_pause_and_newest_entry_bound_the_slot() -> None:
    common = {"window_ms": 50, "rpm": 10, "tpm": 150, "cost": 1}
    assert earliest_slot([(5, 1)], now_ms=0, pause_until_ms=0, **common) == 5
    assert earliest_slot([(5, 1)], now_ms=0, pause_until_ms=30, **common) == 30


def test_sequential_schedule_never_overfills_a_window() -> None:
    """Placing many requests one after another keeps every window within both limits."""
    rng = random.Random(7)
    window_ms, rpm, tpm = 1000, 8, 500
    log: list[tuple[int, int]] = []
    now = 0
    for _ in range(400):
        now += rng.randint(0, 120)
        cost = rng.randint(0, 200)
        slot = earliest_slot(
            log, now_ms=now, pause_until_ms=0, window_ms=window_ms, rpm=rpm, tpm=tpm, cost=cost
        )
        assert slot >= now
        assert not log or slot >= log[-1][0]
        log.append((slot, cost))
    starts = [s for s, _ in log]
    for i, start in enumerate(starts):
        inside = [tokens for s, tokens in log[i:] if s < start + window_ms]
        assert len(inside) <= rpm
        assert sum(inside) <= tpm
