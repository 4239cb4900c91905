"""Global rate limiter shared by every worker thread, process and dyno using one key.

The provider counts requests per minute (rpm) and tokens per minute (tpm) over a
sliding 60 s window. :class:`Throttle` keeps one admissions log per bucket in Redis
(see :mod:`worker.throttle_store`) and admits a request at the earliest instant at
which the window ending there, with the request added, stays within both limits.

A call to :meth:`Throttle.acquire` reserves that instant in one atomic script call and
then sleeps locally until it comes; nobody polls. After a non-zero sleep one cheap
confirm call checks whether a provider 429 paused the bucket meanwhile, in which case
the reservation moves behind the pause. When the request is done the caller settles
the reservation with the tokens it wants charged (the real prompt plus ``max_tokens``,
or prompt plus completion); a request that was never sent is released. That makes at
most three Redis calls per admitted request (reserve, confirm, settle), plus one more
confirm each time a pause moves a sleeping reservation.

All decisions use Redis ``TIME``; the local monotonic clock only measures sleeps.

Errors::

    ThrottleError            base class of everything raised here on purpose
    +-- RequestTooLarge      one request costs more than the whole tpm budget
    +-- ThrottleTimeout      the slot lies further away than ``max_wait``
    +-- ThrottleInterrupted  the ``stop`` event was set while waiting

Redis failures (``redis.ConnectionError``, ``redis.TimeoutError`` and other
``redis.RedisError``) propagate unchanged so callers can retry the task; a reservation
stranded by such a failure only costs capacity until it leaves the window.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from worker.throttle_store import ThrottleStore

#: Upper bound on ``max_wait`` so that ``math.inf`` still converts to milliseconds.
_LONGEST_WAIT_S = 1e9


class ThrottleError(Exception):
    """Base class of the throttle's own errors."""


# The names are the interface the callers catch; they read better without "Error".
class RequestTooLarge(ThrottleError):  # noqa: N818
    """A single request needs more tokens than the per-window budget allows."""


class ThrottleTimeout(ThrottleError):  # noqa: N818
    """The earliest free slot is further away than the caller agreed to wait."""


class ThrottleInterrupted(ThrottleError):  # noqa: N818
    """The caller's stop event was set while waiting; the reservation was released."""


@dataclass(frozen=True)
class Reservation:
    """An admission slot held in the log: its id, reserved tokens and Redis-time start."""

    id: str
    tokens: int
    start_ms: int


@dataclass(frozen=True)
class WindowUsage:
    """Requests and tokens admitted in the window ending now."""

    requests: int
    tokens: int


def earliest_slot(
    entries: Sequence[tuple[int, int]],
    *,
    now_ms: int,
    pause_until_ms: int,
    window_ms: int,
    rpm: int,
    tpm: int,
    cost: int,
) -> int:
    """Return the slot the reserve script picks, given the log as ``(score, tokens)`` pairs.

    This is the reference statement of the Lua computation, used to cross-check it.
    Entries at or before ``now_ms - window_ms`` are pruned. The slot is the earliest
    ``t`` no earlier than now, the pause end and the newest entry such that the entries
    scored in ``(t - window_ms, t]``, plus the new one, fit ``rpm`` and ``tpm``.
    """
    live = sorted((e for e in entries if e[0] > now_ms - window_ms), key=lambda e: e[0])
    floor = max(now_ms, pause_until_ms, live[-1][0] if live else now_ms)
    tokens = cost
    for count, (score, entry_tokens) in enumerate(reversed(live), start=1):
        tokens += entry_tokens
        if count + 1 > rpm or tokens > tpm:
            return max(floor, score + window_ms)
    return floor


class Throttle:
    """Admit requests for one bucket (model plus key fingerprint) within rpm and tpm.

    ``bucket`` is an opaque label such as ``"kimi-k2-5:ab12cd34ef56"``; never the key
    itself, since it ends up in Redis key names. Every client of a bucket must use the
    same limits and window. One instance is safe to share between threads.
    """

    def __init__(
        self,
        redis: redis.Redis,
        bucket: str,
        *,
        rpm: int,
        tpm: int,
        window_s: float = 60.0,
    ) -> None:
        if rpm < 1 or tpm < 1:
            raise ValueError(f"throttle limits must be positive, got rpm={rpm} tpm={tpm}")
        window_ms = round(window_s * 1000)
        if window_ms < 1:
            raise ValueError(f"throttle window must be at least 1 ms, got {window_s} s")
        self.bucket = bucket
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_ms / 1000
        self._store = ThrottleStore(redis, bucket, window_ms=window_ms)

    def acquire(
        self,
        tokens: int,
        *,
        max_wait: float = 3000.0,
        stop: threading.Event | None = None,
    ) -> Reservation:
        """Block until a request costing ``tokens`` may start, and return its reservation.

        Raises :class:`RequestTooLarge` at once if ``tokens`` exceeds tpm, and
        :class:`ThrottleTimeout` (holding no slot) if the slot is more than ``max_wait``
        seconds away, counting from this call (zero or less: only a free slot right now
        will do). Setting ``stop`` ends the wait early with
        :class:`ThrottleInterrupted` after releasing the slot.
        """
        if tokens < 0:
            raise ValueError(f"token cost must not be negative, got {tokens}")
        if tokens > self.tpm:
            raise RequestTooLarge(
                f"request needs {tokens} tokens but bucket {self.bucket} allows only "
                f"{self.tpm} tokens per {self.window_s:g} s; shrink the prompt or max_tokens"
            )
        # A caller whose budget is already spent may pass a negative wait: it means
        # "only if free right now", not a programming error. Infinity means "a long time".
        max_wait = min(max(max_wait, 0.0), _LONGEST_WAIT_S)
        if stop is not None and stop.is_set():
            raise ThrottleInterrupted(f"stop requested before waiting on bucket {self.bucket}")
        deadline = time.monotonic() + max_wait
        rid = uuid.uuid4().hex
        decision = self._store.reserve(
            rid, tokens, rpm=self.rpm, tpm=self.tpm, max_wait_ms=math.floor(max_wait * 1000)
        )
        while True:
            delay_ms = decision.slot_ms - decision.now_ms
            if not decision.admitted:
                raise ThrottleTimeout(
                    f"next slot on bucket {self.bucket} is {delay_ms / 1000:.1f} s away, "
                    f"beyond max_wait={max_wait:g} s"
                )
            if delay_ms <= 0:
                return Reservation(id=rid, tokens=tokens, start_ms=decision.slot_ms)
            self._wait(rid, decision.slot_ms, delay_ms / 1000, stop)
            remaining_ms = max(0, math.floor((deadline - time.monotonic()) * 1000))
            decision = self._store.confirm(
                rid,
                decision.slot_ms,
                tokens,
                rpm=self.rpm,
                tpm=self.tpm,
                max_wait_ms=remaining_ms,
            )

    def _wait(self, rid: str, slot_ms: int, seconds: float, stop: threading.Event | None) -> None:
        """Sleep until the slot, releasing it if the sleep ends any other way."""
        try:
            if stop is None:
                time.sleep(seconds)
                return
            interrupted = stop.wait(seconds)
        except BaseException:
            # KeyboardInterrupt or SystemExit: give the slot back if Redis still answers.
            with contextlib.suppress(redis.RedisError):
                self._store.release(rid, slot_ms)
            raise
        if interrupted:
            self._store.release(rid, slot_ms)
            raise ThrottleInterrupted(f"stop requested while waiting on bucket {self.bucket}")

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Charge ``tokens`` for a finished request instead of the reserved amount.

        Lowering frees budget for later requests; raising it (charging actual usage
        above the estimate) only delays later ones. An entry that already left the
        window no longer counts, so settling it does nothing.
        """
        if tokens < 0:
            raise ValueError(f"settled tokens must not be negative, got {tokens}")
        self._store.settle(reservation.id, reservation.start_ms, tokens)

    def release(self, reservation: Reservation) -> None:
        """Give back the slot of a request that was never sent."""
        self._store.release(reservation.id, reservation.start_ms)

    def pause(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` from now (Redis time), e.g. after a provider 429.

        An existing longer pause is kept. Reservations already made for a slot inside
        the pause move behind it when their holders confirm.
        """
        if seconds < 0:
            raise ValueError(f"pause must not be negative, got {seconds}")
        pause_ms = math.ceil(seconds * 1000)
        if pause_ms > 0:
            self._store.pause(pause_ms)

    def paused_for(self) -> float:
        """Seconds until the bucket admits again because of a pause (0.0 if none)."""
        return self._store.pause_remaining_ms() / 1000

    def usage(self) -> WindowUsage:
        """Requests and tokens admitted in the window ending now (later slots excluded)."""
        requests, tokens = self._store.usage()
        return WindowUsage(requests=requests, tokens=tokens)
