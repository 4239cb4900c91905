"""The room left to other clients of a key (:func:`worker.throttle.next_room`), no Redis."""

from __future__ import annotations

import math

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from worker.throttle import ROOM_DECAY_MS, ROOM_MAX, ROOM_STEP, Throttle, next_room, no_history


def after(
    room: int, *, limit: int, seen: int | None, refused: bool = False, idle_ms: int = 0
) -> int:
    """The room once ``next_room`` was applied (``None`` keeps it)."""
    new = next_room(room, limit=limit, seen=seen, refused=refused, idle_ms=idle_ms)
    return room if new is None else new


def test_the_cases_below_use_steps_of_2_percent_and_a_cap_of_half() -> None:
    assert (ROOM_STEP, ROOM_MAX) == (0.02, 0.5)


def test_it_grows_to_a_step_above_the_others_while_they_use_all_of_it() -> None:
    assert next_room(0, limit=20, seen=5, refused=False, idle_ms=0) == 6
    assert next_room(0, limit=2000, seen=400, refused=False, idle_ms=0) == 440
    assert next_room(5, limit=20, seen=5, refused=False, idle_ms=0) == 6  # all of it
    assert next_room(5, limit=20, seen=7, refused=False, idle_ms=0) == 8
    assert next_room(400, limit=2000, seen=430, refused=False, idle_ms=0) == 470
    assert next_room(6, limit=20, seen=5, refused=False, idle_ms=0) is None  # room to grow


def test_it_shrinks_a_step_an_answer_towards_a_step_above_their_use() -> None:
    # limit 2000: a step is 40
    assert next_room(440, limit=2000, seen=100, refused=False, idle_ms=0) == 400
    assert next_room(141, limit=2000, seen=100, refused=False, idle_ms=0) == 140
    assert next_room(140, limit=2000, seen=100, refused=False, idle_ms=0) is None
    assert next_room(120, limit=2000, seen=100, refused=False, idle_ms=0) is None
    assert next_room(8, limit=20, seen=2, refused=False, idle_ms=0) == 7
    assert next_room(3, limit=20, seen=2, refused=False, idle_ms=0) is None


def test_less_than_half_a_step_counts_as_nothing() -> None:
    # limit 2000: a step is 40; 19 is estimate noise, 20 is somebody's use
    assert next_room(0, limit=2000, seen=19, refused=False, idle_ms=0) is None
    assert next_room(60, limit=2000, seen=19, refused=False, idle_ms=0) == 20
    assert next_room(0, limit=2000, seen=20, refused=False, idle_ms=0) == 60


def test_once_the_others_are_gone_it_shrinks_to_nothing() -> None:
    assert next_room(3, limit=20, seen=0, refused=False, idle_ms=0) == 2
    assert next_room(1, limit=20, seen=0, refused=False, idle_ms=0) == 0
    # Nobody there and nothing left to them: no write.
    assert next_room(0, limit=20, seen=0, refused=False, idle_ms=0) is None


def test_it_never_exceeds_half_the_limit() -> None:
    assert after(9, limit=20, seen=15) == 10
    assert after(10, limit=20, seen=15) == 10
    assert after(999, limit=2000, seen=2000) == 1000
    assert next_room(9, limit=20, seen=None, refused=True, idle_ms=0) == 10
    assert next_room(0, limit=1, seen=1, refused=True, idle_ms=0) == 0  # half of 1 is 0


def test_a_refusal_grows_it_two_steps_whatever_the_headers() -> None:
    assert next_room(0, limit=20, seen=None, refused=True, idle_ms=0) == 2
    assert next_room(0, limit=2000, seen=None, refused=True, idle_ms=0) == 80
    assert next_room(3, limit=20, seen=0, refused=True, idle_ms=0) == 5


def test_without_headers_it_decays_a_step_per_decay_time() -> None:
    assert next_room(80, limit=2000, seen=None, refused=False, idle_ms=ROOM_DECAY_MS - 1) is None
    assert next_room(80, limit=2000, seen=None, refused=False, idle_ms=ROOM_DECAY_MS) == 40
    assert next_room(30, limit=2000, seen=None, refused=False, idle_ms=10 * ROOM_DECAY_MS) == 0
    # Nothing learnt, nothing to forget: no write for an answer without headers.
    assert next_room(0, limit=20, seen=None, refused=False, idle_ms=10**12) is None


def test_with_headers_time_alone_changes_nothing() -> None:
    assert next_room(6, limit=20, seen=5, refused=False, idle_ms=10 * ROOM_DECAY_MS) is None


limits = st.integers(min_value=1, max_value=10_000)


@given(limit=limits, data=st.data())
def test_repeated_answers_settle_a_step_above_what_the_others_use(
    limit: int, data: st.DataObject
) -> None:
    step, most = max(1, math.ceil(limit * ROOM_STEP)), math.floor(limit * ROOM_MAX)
    room = data.draw(st.integers(min_value=0, max_value=most))
    seen = data.draw(st.integers(min_value=0, max_value=limit))
    for _ in range(most + 2):  # a jump up, or a step per answer down
        new = after(room, limit=limit, seen=seen)
        assert 0 <= new <= most
        assert new == room or new == min(most, seen + step) or room - step <= new < room
        room = new
    if 2 * seen < step:  # noise: nobody there
        assert room == 0
    elif seen >= most:
        assert room == most
    else:  # more than they use, by at most a step: room to grow into
        assert seen < room <= min(most, seen + step)
    assert after(room, limit=limit, seen=seen) == room


@given(limit=limits, data=st.data())
def test_decay_reaches_nothing_in_room_over_step_answers(limit: int, data: st.DataObject) -> None:
    step, most = max(1, math.ceil(limit * ROOM_STEP)), math.floor(limit * ROOM_MAX)
    room = data.draw(st.integers(min_value=0, max_value=most))
    for _ in range(math.ceil(room / step)):
        room = after(room, limit=limit, seen=None, idle_ms=ROOM_DECAY_MS)
    assert room == 0


@given(limit=limits, data=st.data())
def test_refusals_reach_half_the_limit_and_stay(limit: int, data: st.DataObject) -> None:
    step, most = max(1, math.ceil(limit * ROOM_STEP)), math.floor(limit * ROOM_MAX)
    room = data.draw(st.integers(min_value=0, max_value=most))
    for _ in range(math.ceil((most - room) / (2 * step))):
        grown = after(room, limit=limit, seen=None, refused=True)
        assert room < grown <= most
        room = grown
    assert room == most
    assert after(room, limit=limit, seen=None, refused=True) == most


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rpm": 0}, "limits must be positive"),
        ({"tpm": 0}, "limits must be positive"),
        ({"window_s": 0.0001}, "at least 1 ms"),
        ({"interactive_reserve": 10}, r"interactive_reserve must lie in \[0, rpm\)"),
        ({"interactive_reserve": -1}, r"interactive_reserve must lie in \[0, rpm\)"),
        ({"floor": 0.51}, r"floor must lie in \[0, 0.5\]"),
        ({"floor": -0.1}, r"floor must lie in \[0, 0.5\]"),
    ],
)
def test_a_throttle_refuses_limits_it_cannot_keep(kwargs: dict[str, float], message: str) -> None:
    limits = {"rpm": 10, "tpm": 1000, "window_s": 1.0, **kwargs}
    client = redis.Redis()  # never connected: the checks come first
    with pytest.raises(ValueError, match=message):
        Throttle(client, "unit:1", seed=no_history, **limits)  # type: ignore[arg-type]
