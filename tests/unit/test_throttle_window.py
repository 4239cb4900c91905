"""The reference slot computation against a brute-force reading of the sliding window."""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.throttle import Throttle, no_history
from worker.throttle_reference import (
    INTERACTIVE_KINDS,
    earliest_slot,
    interactive_hold,
    interactive_slot,
)


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


@st.composite
def held_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A bulk placement with interactive entries in the log and a hold to respect.

    The hold leaves room for the request once the window is empty, as the throttle's
    does (at most the interactive share of each limit): a hold that alone exceeds the
    limit has no slot to compare.
    """
    case = draw(cases())
    entries = [
        (score, tokens, draw(st.sampled_from(["b.", "i.", "w.", "x."])) + f"{n}:{tokens}")
        for n, (score, tokens) in enumerate(case["entries"])
    ]
    hold_requests = draw(st.integers(0, case["rpm"] - 1))
    hold_tokens = draw(st.integers(0, case["tpm"] - case["cost"]))
    return case | {"entries": entries, "hold_requests": hold_requests, "hold_tokens": hold_tokens}


def brute_force_held_slot(case: dict[str, Any]) -> int | None:
    """Every millisecond from the floor on, up to one window past the newest entry.

    By then the window holds nothing, so with a hold that leaves room a slot is found.
    """
    entries = case["entries"]
    floor = max([case["now_ms"], case["pause_until_ms"], *(e[0] for e in entries)])
    for t in range(floor, floor + case["window_ms"] + 1):
        inside = [e for e in entries if t - case["window_ms"] < e[0] <= t]
        # Interactive entries that found room and other clients' phantoms use the hold
        # up; interactive entries that waited (w.) took bulk's place and do not.
        mine = [e for e in inside if e[2].startswith(("i.", "x."))]
        free_requests = case["rpm"] - max(0, case["hold_requests"] - len(mine))
        free_tokens = case["tpm"] - max(0, case["hold_tokens"] - sum(e[1] for e in mine))
        if len(inside) + 1 <= free_requests and sum(e[1] for e in inside) + case["cost"] <= (
            free_tokens
        ):
            return t
    return None  # the hold alone exceeds the limit: no window ever fits


@settings(max_examples=400, deadline=None)
@given(held_cases())
def test_held_reference_matches_brute_force(case: dict[str, Any]) -> None:
    assert earliest_slot(**case) == brute_force_held_slot(case)


def test_interactive_entries_use_the_hold_instead_of_adding_to_it() -> None:
    common = {"now_ms": 100, "pause_until_ms": 0, "window_ms": 50, "rpm": 5, "tpm": 10**6}
    bulk = [(90, 1, "b.1:1"), (95, 1, "b.2:1")]
    # Two bulk entries, a hold of two: one more bulk fits now, a second waits.
    assert earliest_slot(bulk, cost=1, hold_requests=2, **common) == 100
    assert earliest_slot([*bulk, (100, 1, "b.3:1")], cost=1, hold_requests=2, **common) == 140
    # Two interactive entries already use the hold: bulk may fill the window.
    mixed = [*bulk, (96, 1, "i.1:1"), (97, 1, "i.2:1")]
    assert earliest_slot(mixed, cost=1, hold_requests=2, **common) == 100
    # Two that waited took bulk's place: the hold stays whole, so bulk waits until
    # only two entries are left in the window.
    waited = [*bulk, (96, 1, "w.1:1"), (97, 1, "w.2:1")]
    assert earliest_slot(waited, cost=1, hold_requests=2, **common) == 145


def test_hold_follows_the_interactive_rate() -> None:
    common = {"window_ms": 60_000, "rpm": 150, "tpm": 800_000, "cap": 75}
    assert interactive_hold([], now_ms=10**6, **common) == (0, 0)
    # One every 5 s for five windows: 60 over the 295 s they span, 12.2 a window;
    # a quarter more is 15.25, rounded up 16, plus one: 17 requests. Tokens likewise,
    # plus the largest request: 15,255 + 1,000.
    now = 10**6
    steady = [(now - 5_000 * k, 1_000) for k in range(60)]
    assert interactive_hold(steady, now_ms=now, **common) == (17, 16_255)
    # Older than five windows: forgotten.
    assert interactive_hold([(now - 300_000, 1_000)], now_ms=now, **common) == (0, 0)
    # A single recent request: the rate of one window.
    assert interactive_hold([(now - 1_000, 500)], now_ms=now, **common) == (3, 1_125)
    # A reserve holds its share at all times, and the seen rate only adds to it.
    assert interactive_hold([], now_ms=now, reserve=15, **common) == (15, 80_000)
    assert interactive_hold(steady, now_ms=now, reserve=15, **common) == (17, 80_000)
    # Never above the interactive share.
    flood = [(now - k, 9_000) for k in range(1_000)]
    assert interactive_hold(flood, now_ms=now, **common) == (75, 400_000)


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


# --- interactive placement ------------------------------------------------------------


def inside(
    entries: list[tuple[int, int, str]], end: int, window_ms: int
) -> list[tuple[int, int, str]]:
    return [e for e in entries if end - window_ms < e[0] <= end]


def fits_new(
    entries: list[tuple[int, int, str]], t: int, cost: int, w: int, rpm: int, tpm: int
) -> bool:
    """Every window containing ``t``, checked millisecond by millisecond, takes one more."""
    return all(
        len(inside(entries, end, w)) + 1 <= rpm
        and sum(e[1] for e in inside(entries, end, w)) + cost <= tpm
        for end in range(t, t + w)
    )


def fits_swap(
    entries: list[tuple[int, int, str]], k: int, cost: int, w: int, tpm: int, cap: int
) -> bool:
    """The interactive request may replace entry ``k``: cap and (if it costs more) tpm hold."""
    score, tokens, _ = entries[k]
    delta = cost - tokens
    return all(
        sum(1 for e in inside(entries, end, w) if e[2].startswith(INTERACTIVE_KINDS)) + 1 <= cap
        and (delta <= 0 or sum(e[1] for e in inside(entries, end, w)) + delta <= tpm)
        for end in range(score, score + w)
    )


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, object]:
    """A valid log built by placing entries one after another, some booked ahead of now."""
    window_ms = draw(st.integers(2, 30))
    rpm = draw(st.integers(1, 5))
    tpm = draw(st.integers(1, 40))
    now_ms = 100
    entries: list[tuple[int, int, str]] = []
    t = now_ms - window_ms + 1
    for i in range(draw(st.integers(0, 12))):
        t += draw(st.integers(0, window_ms // 2))
        cost = draw(st.integers(0, tpm))
        slot = earliest_slot(
            [(s, c) for s, c, _ in entries],
            now_ms=t, pause_until_ms=0, window_ms=window_ms, rpm=rpm, tpm=tpm, cost=cost,
        )  # fmt: skip
        kind = draw(st.sampled_from(["b.", "b.", "i.", "w.", "x."]))
        entries.append((slot, cost, f"{kind}{i:02d}"))
    return {
        "entries": entries,
        "now_ms": now_ms,
        "pause_until_ms": draw(st.one_of(st.just(0), st.integers(now_ms, now_ms + 40))),
        "window_ms": window_ms,
        "rpm": rpm,
        "tpm": tpm,
        "cap": draw(st.integers(0, rpm)),
        "cost": draw(st.integers(0, tpm)),
    }


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_interactive_slot_is_the_first_valid_option(case: dict[str, Any]) -> None:
    slot, displaced = interactive_slot(**case)
    now, w, rpm, tpm = case["now_ms"], case["window_ms"], case["rpm"], case["tpm"]
    cap, cost = case["cap"], case["cost"]
    live = sorted((e for e in case["entries"] if e[0] > now - w), key=lambda e: (e[0], e[2]))
    floor = max(now, case["pause_until_ms"])
    gap = fits_new(live, floor, cost, w, rpm, tpm)
    candidates = [
        k
        for k, (score, _, member) in enumerate(live)
        if member.startswith("b.") and score > now and floor <= score < floor + 2 * w
    ]
    first_swap = next(
        (k for k in candidates if cap > 0 and fits_swap(live, k, cost, w, tpm, cap)), None
    )
    if gap:
        assert (slot, displaced) == (floor, None)
    elif first_swap is not None:
        assert (slot, displaced) == (live[first_swap][0], live[first_swap][2])
    else:
        pairs = [(s, c) for s, c, _ in live]
        assert displaced is None
        assert slot == brute_force_slot(
            pairs, now_ms=now, pause_until_ms=case["pause_until_ms"], window_ms=w, rpm=rpm,
            tpm=tpm, cost=cost,
        )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_interactive_placement_keeps_every_booked_window_within_limits(
    case: dict[str, Any],
) -> None:
    slot, displaced = interactive_slot(**case)
    now, w, rpm, tpm = case["now_ms"], case["window_ms"], case["rpm"], case["tpm"]
    live = [e for e in case["entries"] if e[0] > now - w]
    after = [e for e in live if e[2] != displaced] + [(slot, case["cost"], "i.new")]
    if displaced is not None:
        (moved_tokens,) = [e[1] for e in live if e[2] == displaced]
        moved = earliest_slot(
            [(s, c) for s, c, _ in after], now_ms=now, pause_until_ms=case["pause_until_ms"],
            window_ms=w, rpm=rpm, tpm=tpm, cost=moved_tokens,
        )  # fmt: skip
        assert moved >= max(s for s, _, _ in live)  # to the end of the queue
        after.append((moved, moved_tokens, displaced))
        # Where the request took a slot over, interactive entries stay within the cap.
        for end in range(slot, slot + w):
            assert (
                sum(1 for e in inside(after, end, w) if e[2].startswith(INTERACTIVE_KINDS))
                <= case["cap"]
            )
    # Every window holding a booked (future) entry is within both limits.
    for score, _, _ in after:
        if score > now:
            window = inside(after, score, w)
            assert len(window) <= rpm
            assert sum(e[1] for e in window) <= tpm


def test_share_outside_zero_to_one_is_refused() -> None:
    client = redis.Redis()  # never connects: the arguments are checked first
    with pytest.raises(ValueError, match="interactive_share"):
        Throttle(client, "b", rpm=10, tpm=10, interactive_share=1.5)
    assert no_history() == []
