"""Pure-Python statements of the throttle's slot computations, to cross-check the Lua.

:mod:`worker.throttle_lua` computes every slot inside Redis; the functions here state
the same rules over a plain list of log entries. The tests compare the two on random
logs, so a change to one that is not made to the other fails there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from worker.throttle_lua import HISTORY_WINDOWS

#: A log entry as the reference functions take it: ``(score, tokens)``, or
#: ``(score, tokens, member)`` where the member's prefix says its kind.
Entry = tuple[int, int] | tuple[int, int, str]

#: Prefixes of interactive entries, both counted against the takeover cap: found room
#: at once (``i.``) or had to wait (``w.``).
INTERACTIVE_KINDS = ("i.", "w.")


def _uses_hold(entry: Entry) -> bool:
    """Interactive entries that found room and external phantoms use the held room.

    Interactive entries that waited (``w.``) took a bulk slot or the end of the queue
    instead: bulk keeps the whole hold free for later arrivals.
    """
    return len(entry) > 2 and entry[2].startswith(("i.", "x."))


def earliest_slot(
    entries: Sequence[Entry],
    *,
    now_ms: int,
    pause_until_ms: int,
    window_ms: int,
    rpm: int,
    tpm: int,
    cost: int,
    hold_requests: int = 0,
    hold_tokens: int = 0,
) -> int:
    """Return the slot at the end of the queue, given the log.

    This is the reference statement of the Lua computation for a bulk request, used
    to cross-check it. Entries at or before ``now_ms - window_ms`` are pruned. The slot
    is the earliest ``t`` no earlier than now, the pause end and the newest entry such
    that the entries scored in ``(t - window_ms, t]``, plus the new one, fit ``rpm``
    and ``tpm`` with ``hold_requests`` and ``hold_tokens`` left over, less what the
    interactive entries and external phantoms among them use (see
    :func:`interactive_hold`).
    """
    live = sorted((e for e in entries if e[0] > now_ms - window_ms), key=lambda e: e[0])
    floor = max(now_ms, pause_until_ms, live[-1][0] if live else now_ms)
    tokens, held, held_tokens = cost, 0, 0
    for count, entry in enumerate(reversed(live), start=1):
        tokens += entry[1]
        if _uses_hold(entry):
            held += 1
            held_tokens += entry[1]
        if (
            count + 1 + max(0, hold_requests - held) > rpm
            or tokens + max(0, hold_tokens - held_tokens) > tpm
        ):
            return max(floor, entry[0] + window_ms)
    return floor


def interactive_hold(
    history: Sequence[tuple[int, int]],
    *,
    now_ms: int,
    window_ms: int,
    rpm: int,
    tpm: int,
    cap: int,
    reserve: int = 0,
) -> tuple[int, int]:
    """Return the requests and tokens of each window that bulk leaves to others.

    The reference statement of the Lua computation. ``history`` holds the ``(score,
    tokens)`` of interactive admissions and of external phantoms (other clients of
    the key, learnt from the provider's headers); those of the last :data:`HISTORY_WINDOWS`
    windows give a rate per window, measured over the span they cover (at least one
    window). The hold is that rate plus a quarter, plus one request and one request's
    worth of tokens (the largest seen) for an arrival above the rate; at least
    ``reserve`` requests and the same share of ``tpm`` at all times; at most ``cap``
    requests and the same share of ``tpm``. Without a hold a saturating bulk backlog
    books every slot of the coming windows, and an interactive request can only take
    over a booked bulk slot at the next roll of a strict window, up to a window away.
    """
    hold_requests = min(cap, reserve)
    hold_tokens = math.floor(tpm * hold_requests / rpm)
    live = [e for e in history if e[0] > now_ms - HISTORY_WINDOWS * window_ms]
    if cap <= 0 or not live:
        return hold_requests, hold_tokens
    windows = max(window_ms, now_ms - min(score for score, _ in live)) / window_ms
    tokens = sum(t for _, t in live)
    seen_requests = min(cap, math.ceil(1.25 * len(live) / windows) + 1)
    seen_tokens = min(
        math.floor(tpm * cap / rpm), math.ceil(1.25 * tokens / windows) + max(t for _, t in live)
    )
    return max(hold_requests, seen_requests), max(hold_tokens, seen_tokens)


def stored_kind(slot_ms: int, now_ms: int) -> str:
    """The prefix an interactive reservation placed at ``slot_ms`` is logged under."""
    return "w." if slot_ms > now_ms else "i."


def interactive_slot(
    entries: Sequence[tuple[int, int, str]],
    *,
    now_ms: int,
    pause_until_ms: int,
    window_ms: int,
    rpm: int,
    tpm: int,
    cap: int,
    cost: int,
) -> tuple[int, str | None]:
    """Return an interactive request's slot and the bulk member it takes over, if any.

    This is the reference statement of the Lua computation, over the log as
    ``(score, tokens, member)`` triples. With ``floor = max(now, pause end)``:

    1. ``floor`` itself, if every window containing it still fits with the request
       added (spare capacity: nobody moves);
    2. else the slot of the first bulk member (``b.`` prefix, in score then member
       order) scored after now, at or after the floor and before ``floor + 2 W``,
       such that every window containing that slot holds fewer than ``cap``
       interactive (``i.`` or ``w.``) entries and, if the request costs more than the bulk
       entry, still fits ``tpm`` after the swap;
    3. else the end of the queue, as :func:`earliest_slot`.

    The script stores the request as ``w.`` rather than ``i.`` when the slot is later
    than now (:func:`stored_kind`).
    """
    live = sorted((e for e in entries if e[0] > now_ms - window_ms), key=lambda e: (e[0], e[2]))
    floor = max(now_ms, pause_until_ms)

    def inside(end: int) -> list[tuple[int, int, str]]:
        return [e for e in live if end - window_ms < e[0] <= end]

    def ends(start: int) -> list[int]:
        # Window totals only grow at entry scores: these ends cover every window
        # that contains ``start``.
        return [start, *(e[0] for e in live if start < e[0] < start + window_ms)]

    if all(
        len(inside(end)) + 1 <= rpm and sum(e[1] for e in inside(end)) + cost <= tpm
        for end in ends(floor)
    ):
        return floor, None
    if cap > 0:
        for score, tokens, member in live:
            if score >= floor + 2 * window_ms:
                break
            if score <= now_ms or score < floor or not member.startswith("b."):
                continue
            delta = cost - tokens
            if all(
                sum(1 for e in inside(end) if e[2].startswith(INTERACTIVE_KINDS)) + 1 <= cap
                and (delta <= 0 or sum(e[1] for e in inside(end)) + delta <= tpm)
                for end in ends(score)
            ):
                return score, member
    pairs = [(score, tokens) for score, tokens, _ in live]
    slot = earliest_slot(
        pairs,
        now_ms=now_ms,
        pause_until_ms=pause_until_ms,
        window_ms=window_ms,
        rpm=rpm,
        tpm=tpm,
        cost=cost,
    )
    return slot, None
