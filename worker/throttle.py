"""Global rate limiter shared by every worker thread, process and dyno using one key.

The provider counts requests per minute (rpm) and tokens per minute (tpm) over a
sliding 60 s window. :class:`Throttle` keeps one admissions log per bucket in Redis
(scripts in :mod:`worker.throttle_lua`, wrapper in :mod:`worker.throttle_store`) and
admits a request at the earliest instant at which every window holding it stays
within both limits.

A call to :meth:`Throttle.acquire` reserves that instant in one atomic script call and
then sleeps locally until it comes; nobody polls. Every sleeper confirms its slot when
it wakes (one cheap script call): the slot may have moved meanwhile, because

* a provider 429 paused the bucket (the reservation moves behind the pause), or
* an interactive request took the slot over (bulk only; see below), or
* the provider reported somebody else's usage of the key (see :meth:`Throttle.observe`),

in which case the caller sleeps again until its new slot and confirms once more.

With a booking horizon, a bulk request books only once its slot is that close.
Until then it holds nothing and waits in its process's line of unbooked requests:
the first in line sleeps until its projected slot less the horizon, or until this
process settles or releases a reservation below its cost, then places itself again
with a fresh price; each one that books or gives up lets the next one try. A slot
booked a window ahead would fix its cost with the estimate of the moment and keep
that window's room from what earlier calls settle below their reservations; when
tokens bind, both cost throughput.

When the request is done the caller settles the reservation with the tokens it wants
charged (the real prompt plus ``max_tokens``, or prompt plus completion); a request
that was never sent is released. Redis round trips per admitted request: reserve,
confirm (only if it had to wait), settle; plus one confirm per move of a sleeping
reservation, and one place per wake of an unbooked bulk request. The first call on a
lost bucket with a ``seed`` callable pays one more.

Priorities. Bulk requests queue first come, first served at the end of the log.
An interactive request takes the earliest free instant if one exists; otherwise it
takes over the slot of the earliest bulk reservation that has not started yet, and
that bulk reservation moves to the end of the queue. Takeovers are capped so that no
window holding a taken-over slot holds more than ``floor(interactive_share * rpm)``
interactive entries: bulk keeps the rest of the window while it waits. Takeovers are
looked for within two windows of now; an interactive request that finds none there
joins the end of the queue like a bulk one.

A takeover is a last resort: when a strict window is full, the next booked bulk slot
may lie at its next roll, up to a window away. So bulk requests hold part of every
window back for interactive ones (:func:`worker.throttle_reference.interactive_hold`):
sized to the interactive rate seen over the last five windows, and at least
``interactive_reserve`` requests at all times. Interactive requests that found room
use the hold up before bulk gives up anything more; those that had to wait took a bulk
slot over (or joined the end of the queue) and leave the hold to the next arrivals, or
a backlog released at a roll would use up the next window's hold. With no interactive
traffic seen and no reserve, bulk fills every window. Other clients of the key (see
:meth:`Throttle.observe`) count as interactive traffic here: bulk leaves room for their
rate too, so that their next calls find it instead of displacing ours (and theirs are
not all refused).

Seeding. The provider remembers the last window even when Redis loses the log
(restart, flush, expiry after an idle window). A bucket without its initialised
marker is seeded before anything is admitted: with the ``seed`` callable's history
of recent calls, or, without one, by assuming the window may be full and pausing the
bucket for one window.

All decisions use Redis ``TIME``; the local monotonic clock only measures sleeps.

Errors::

    ThrottleError            base class of everything raised here on purpose
    +-- RequestTooLarge      one request costs more than the whole tpm budget
    +-- ThrottleTimeout      the slot lies further away than ``max_wait``
    +-- ThrottleInterrupted  the ``stop`` event was set while waiting

Redis failures (``redis.ConnectionError``, ``redis.TimeoutError`` and other
``redis.RedisError``) and failures of the ``seed`` callable propagate unchanged so
callers can retry the task; a reservation stranded by such a failure only costs
capacity until it leaves the window.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from jobs.models import Priority
from worker.throttle_store import InitMode, SlotDecision, SlotStatus, ThrottleStore

#: Upper bound on ``max_wait`` so that ``math.inf`` still converts to milliseconds.
_LONGEST_WAIT_S = 1e9

#: How late (ms) a call may start after its slot, by default, before
#: :meth:`Throttle.starting` moves its entry: far above the few ms a sleeping thread
#: normally wakes late. The worker passes half its window margin instead.
LATE_START_MS = 100

#: Longest an unbooked sleeper goes without looking at its ``stop`` event (s).
_STOP_CHECK_S = 1.0

#: Share of each limit by which the provider may report more usage than our window
#: holds before :meth:`Throttle.observe` assumes somebody else uses the key. The
#: provider counted its window when it answered, ours is counted now: calls that left
#: the window since make the provider look busier than we are, calls admitted since
#: make it look idler. The slack (at least one request, one token) absorbs the first.
OBSERVE_SLACK = 0.02

#: What a ``seed`` callable returns: ``(age in seconds, tokens)`` per call admitted in
#: the last window, ages measured on one clock at the time of the call.
History = Sequence[tuple[float, int]]


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
    """An admission slot held in the log: its id, reserved tokens and Redis-time start.

    ``granted_ms`` is Redis time when the slot was granted and ``granted_at`` the local
    monotonic clock then: together they tell how late the call really starts.
    """

    id: str
    tokens: int
    start_ms: int
    granted_ms: int = 0
    granted_at: float = 0.0


@dataclass(frozen=True)
class WindowUsage:
    """Requests and tokens in the window ending now, external phantoms included.

    ``external_requests`` and ``external_tokens`` are the part learnt from the
    provider's headers (somebody else using the key).
    """

    requests: int
    tokens: int
    external_requests: int = 0
    external_tokens: int = 0


@dataclass(frozen=True)
class ThrottleStats:
    """What one :class:`Throttle` instance did so far: calls admitted, Redis commands sent."""

    admitted: int
    redis_round_trips: int


@dataclass(frozen=True)
class ExternalUsage:
    """Usage by others that one :meth:`Throttle.observe` call added to the window."""

    requests: int
    tokens: int


def no_history() -> list[tuple[float, int]]:
    """A ``seed`` for a bucket known to have had no calls in the last window.

    Right for tests and for a key nobody has used yet; a worker should read its
    ledger instead.
    """
    return []


class Throttle:
    """Admit requests for one bucket (model plus key fingerprint) within rpm and tpm.

    ``bucket`` is an opaque label such as ``"kimi-k2-5:ab12cd34ef56"``; never the key
    itself, since it ends up in Redis key names. Every client of a bucket must use the
    same limits, window, ``interactive_share`` and ``interactive_reserve``. One
    instance is safe to share between threads.

    ``seed`` returns the calls admitted during the last window, as ``(age seconds,
    tokens)`` pairs (the worker reads them from its ledger). It is called when the
    bucket has no initialised marker: a new bucket, or one whose log Redis lost. The
    first acquirer to get there logs the history at ``Redis now - age``; concurrent
    acquirers never log it twice. With ``seed=None`` such a bucket is treated as if the
    provider's window were full: nothing is admitted until one window from then. The
    marker expires with the log, one window after the last booked slot, so a bucket
    left idle that long is seeded (or, without ``seed``, paused) again on next use.

    ``booking_horizon_s`` (None: book at once) is how close a bulk request's slot must
    be before it is booked; see the module docstring.
    """

    def __init__(
        self,
        redis: redis.Redis,
        bucket: str,
        *,
        rpm: int,
        tpm: int,
        window_s: float = 60.0,
        interactive_share: float = 0.5,
        interactive_reserve: int = 0,
        late_start_ms: int = LATE_START_MS,
        booking_horizon_s: float | None = None,
        seed: Callable[[], History] | None = None,
    ) -> None:
        if rpm < 1 or tpm < 1:
            raise ValueError(f"throttle limits must be positive, got rpm={rpm} tpm={tpm}")
        window_ms = round(window_s * 1000)
        if window_ms < 1:
            raise ValueError(f"throttle window must be at least 1 ms, got {window_s} s")
        if not 0.0 <= interactive_share <= 1.0:
            raise ValueError(f"interactive_share must lie in [0, 1], got {interactive_share}")
        self.bucket = bucket
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_ms / 1000
        self.interactive_share = interactive_share
        self._window_ms = window_ms
        self._cap = math.floor(interactive_share * rpm)
        if interactive_reserve < 0:
            raise ValueError(f"interactive_reserve must not be negative, got {interactive_reserve}")
        self._reserve = interactive_reserve
        self._late_start_ms = late_start_ms
        if booking_horizon_s is not None and not 0 <= booking_horizon_s < self.window_s:
            raise ValueError(f"booking horizon must lie in [0, window), got {booking_horizon_s}")
        self._horizon_ms = None if booking_horizon_s is None else round(booking_horizon_s * 1000)
        # Bulk requests sleeping unbooked, oldest first (see _book).
        self._unbooked: collections.deque[threading.Event] = collections.deque()
        self._unbooked_lock = threading.Lock()
        self._seed = seed
        self._store = ThrottleStore(redis, bucket, window_ms=window_ms)
        # One thread per instance reads the history at a time; the others reuse its
        # seeding instead of querying the ledger too. Bumped after every seeding.
        self._seeding = threading.Lock()
        self._seedings = 0
        self._admitted = 0
        self._admitted_lock = threading.Lock()

    def stats(self) -> ThrottleStats:
        """Calls this instance admitted and the Redis commands it sent (every thread's)."""
        return ThrottleStats(admitted=self._admitted, redis_round_trips=self._store.round_trips)

    def acquire(
        self,
        tokens: int | Callable[[], int],
        *,
        max_wait: float = 3000.0,
        stop: threading.Event | None = None,
        priority: int = Priority.BULK,
    ) -> Reservation:
        """Block until a request costing ``tokens`` may start, and return its reservation.

        ``priority`` is a :class:`jobs.models.Priority` value: interactive requests go
        ahead of waiting bulk ones (within the interactive share). Raises
        :class:`RequestTooLarge` at once if ``tokens`` exceeds tpm, and
        :class:`ThrottleTimeout` (holding no slot) if the slot is more than ``max_wait``
        seconds away, counting from this call (zero or less: only a free slot right
        now will do); a bulk reservation moved later by an interactive takeover can
        also time out when it wakes. Setting ``stop`` ends the wait early with
        :class:`ThrottleInterrupted` after releasing the slot.

        ``tokens`` may be a callable that prices the request: with a booking horizon
        a bulk request books only when its slot is that close, and is priced afresh
        each time it tries (a calibrated estimate may have improved meanwhile).
        """
        price = tokens if callable(tokens) else lambda: tokens
        interactive = Priority(priority) is Priority.INTERACTIVE
        kind = "i." if interactive else "b."
        # A caller whose budget is already spent may pass a negative wait: it means
        # "only if free right now", not a programming error. Infinity means "a long time".
        max_wait = min(max(max_wait, 0.0), _LONGEST_WAIT_S)
        if stop is not None and stop.is_set():
            raise ThrottleInterrupted(f"stop requested before waiting on bucket {self.bucket}")
        deadline = time.monotonic() + max_wait
        rid = kind + uuid.uuid4().hex
        cost, decision = self._book(
            rid, price, deadline, stop, horizon_ms=None if interactive else self._horizon_ms
        )
        while True:
            delay_ms = decision.slot_ms - decision.now_ms
            if not decision.admitted:
                raise ThrottleTimeout(
                    f"next slot on bucket {self.bucket} is {delay_ms / 1000:.1f} s away, "
                    f"beyond max_wait={max_wait:g} s"
                )
            if delay_ms <= 0:
                with self._admitted_lock:
                    self._admitted += 1
                return Reservation(
                    id=rid,
                    tokens=cost,
                    start_ms=decision.slot_ms,
                    granted_ms=decision.now_ms,
                    granted_at=time.monotonic(),
                )
            self._wait(rid, cost, decision.slot_ms, delay_ms / 1000, stop)
            decision = self._place(rid, cost, _ms_until(deadline), confirm=True)

    def _check_cost(self, tokens: int) -> int:
        if tokens < 0:
            raise ValueError(f"token cost must not be negative, got {tokens}")
        if tokens > self.tpm:
            raise RequestTooLarge(
                f"request needs {tokens} tokens but bucket {self.bucket} allows only "
                f"{self.tpm} tokens per {self.window_s:g} s; shrink the prompt or max_tokens"
            )
        return tokens

    def _book(
        self,
        rid: str,
        price: Callable[[], int],
        deadline: float,
        stop: threading.Event | None,
        *,
        horizon_ms: int | None,
    ) -> tuple[int, SlotDecision]:
        """Reserve a slot no further than the horizon; until then, sleep unbooked.

        Booking a slot a window or more ahead fixes its cost with today's estimate
        and keeps that window's room from whatever the calls before it settle
        below their reservations. Unbooked sleepers wait in line (see
        :meth:`_sleep_unbooked`) and try again when their turn comes. Returns the cost
        booked and the decision; one not admitted lies beyond the deadline.
        """
        woken = threading.Event()
        queued = False
        try:
            while True:
                cost = self._check_cost(price())
                remaining_ms = _ms_until(deadline)
                limit_ms = remaining_ms if horizon_ms is None else min(remaining_ms, horizon_ms)
                decision = self._place(rid, cost, limit_ms, confirm=False)
                delay_ms = decision.slot_ms - decision.now_ms
                if decision.admitted or horizon_ms is None or delay_ms > remaining_ms:
                    return cost, decision
                if not queued:
                    with self._unbooked_lock:
                        self._unbooked.append(woken)
                    queued = True
                self._sleep_unbooked(woken, (delay_ms - horizon_ms) / 1000, deadline, stop)
        finally:
            if queued:
                self._leave_line(woken)

    def _sleep_unbooked(
        self,
        woken: threading.Event,
        seconds: float,
        deadline: float,
        stop: threading.Event | None,
    ) -> None:
        """Sleep unbooked, holding nothing, until it is this request's turn to try again.

        Unbooked sleepers of this process queue in line. Only the first one sleeps
        until its projected slot less the horizon; the others sleep until the one
        before them leaves the line (booked, timed out or stopped) and wakes them. All
        of them would project the same next free slot, so each would otherwise wake
        for it and all but the first few would find it taken: a script call each per
        slot. A refund wakes the first one early (see :meth:`_freed_tokens`).
        """
        end = time.monotonic() + seconds
        while not woken.is_set():
            if stop is not None and stop.is_set():
                break
            with self._unbooked_lock:
                first = self._unbooked[0] is woken
            left = (end if first else deadline) - time.monotonic()
            if left <= 0:
                break
            # One Event cannot also watch ``stop`` or the line moving: look every second.
            woken.wait(min(left, _STOP_CHECK_S))
        woken.clear()
        if stop is not None and stop.is_set():
            raise ThrottleInterrupted(f"stop requested while waiting on bucket {self.bucket}")

    def _leave_line(self, woken: threading.Event) -> None:
        """Leave the line of unbooked sleepers; if first, let the next one try at once."""
        with self._unbooked_lock:
            first = bool(self._unbooked) and self._unbooked[0] is woken
            with contextlib.suppress(ValueError):
                self._unbooked.remove(woken)
            if first and self._unbooked:
                self._unbooked[0].set()

    def _freed_tokens(self, tokens: int) -> None:
        """Wake the first unbooked sleeper: ``tokens`` below a reservation came free.

        Only this process's: the room may be too small for it (it sleeps again after
        one script call), and other processes wake their own sleepers when they settle.
        When it books, it wakes the next in line in turn.
        """
        if tokens <= 0:
            return
        with self._unbooked_lock:
            if self._unbooked:
                self._unbooked[0].set()

    def _place(self, rid: str, tokens: int, max_wait_ms: int, *, confirm: bool) -> SlotDecision:
        """Reserve or confirm; seed the bucket first if the script finds it lost.

        Another process may seed the bucket at the same moment: the script logs the
        history only while the bucket is still uninitialised, so it never counts twice.
        """

        def place(init: InitMode, history: Sequence[tuple[int, int]] = ()) -> SlotDecision:
            return self._store.place(
                rid,
                tokens,
                rpm=self.rpm,
                tpm=self.tpm,
                max_wait_ms=max_wait_ms,
                interactive_cap=self._cap,
                interactive_reserve=self._reserve,
                confirm=confirm,
                init=init,
                history=history,
            )

        seedings = self._seedings
        decision = place(InitMode.ASSUME_FULL if self._seed is None else InitMode.CHECK)
        if decision.status is SlotStatus.UNSEEDED:
            with self._seeding:
                if self._seedings != seedings:  # a sibling thread seeded meanwhile
                    decision = place(InitMode.CHECK)
                if decision.status is SlotStatus.UNSEEDED:
                    decision = place(InitMode.SEED, self._history())
                    self._seedings += 1
        return decision

    def _history(self) -> list[tuple[int, int]]:
        """The seed callable's history as ``(age ms, tokens)``, within one window."""
        assert self._seed is not None
        history: list[tuple[int, int]] = []
        for age_s, tokens in self._seed():
            age_ms = max(0, math.floor(age_s * 1000)) if math.isfinite(age_s) else None
            if age_ms is not None and age_ms < self._window_ms:
                history.append((age_ms, max(0, int(tokens))))
        return history

    def _wait(
        self, rid: str, tokens: int, slot_ms: int, seconds: float, stop: threading.Event | None
    ) -> None:
        """Sleep until the slot, releasing it if the sleep ends any other way."""
        try:
            if stop is None:
                time.sleep(seconds)
                return
            interrupted = stop.wait(seconds)
        except BaseException:
            # KeyboardInterrupt or SystemExit: give the slot back if Redis still answers.
            with contextlib.suppress(redis.RedisError):
                self._store.release(rid, slot_ms, tokens)
            raise
        if interrupted:
            self._store.release(rid, slot_ms, tokens)
            raise ThrottleInterrupted(f"stop requested while waiting on bucket {self.bucket}")

    def starting(self, reservation: Reservation) -> Reservation:
        """Call right before sending: moves the slot to now if the call starts late.

        Work between the grant and the send (the ledger row, a CPU busy with a whole
        window's calls) delays the send; past ``late_start_ms`` the entry is moved
        to Redis now, and the booked entries it leaves no room for move later (their
        holders learn it when they confirm). Returns the reservation to settle or
        release from then on. Costs a script call only when late.
        """
        late_ms = (
            reservation.granted_ms
            + (time.monotonic() - reservation.granted_at) * 1000
            - reservation.start_ms
        )
        if late_ms <= self._late_start_ms:
            return reservation
        slot_ms, moved = self._store.restamp(
            reservation.id,
            reservation.start_ms,
            rpm=self.rpm,
            tpm=self.tpm,
            interactive_cap=self._cap,
            interactive_reserve=self._reserve,
        )
        if not moved:
            return reservation
        return dataclasses.replace(reservation, start_ms=slot_ms)

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Charge ``tokens`` for a finished request instead of the reserved amount.

        Lowering frees budget for later requests; raising it (charging actual usage
        above the estimate) only delays later ones. An entry that already left the
        window no longer counts, so settling it does nothing.
        """
        if tokens < 0:
            raise ValueError(f"settled tokens must not be negative, got {tokens}")
        self._store.settle(reservation.id, reservation.start_ms, tokens)
        self._freed_tokens(reservation.tokens - tokens)

    def refused(self, reservation: Reservation) -> None:
        """Record that the provider refused the call (429) although the bucket admitted it.

        Somebody else holds that place in the provider's window: the entry stays,
        as an external phantom, until it leaves ours, and bulk leaves room for the
        other client's rate from then on (see the module docstring). Pause the
        bucket as well (:meth:`pause`); retrying the request means a new
        :meth:`acquire`.
        """
        self._store.refused(reservation.id, reservation.start_ms)

    def release(self, reservation: Reservation) -> None:
        """Give back the slot of a request that was never sent."""
        self._store.release(reservation.id, reservation.start_ms, reservation.tokens)
        self._freed_tokens(reservation.tokens)

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

    def observe(
        self,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_requests_s: float | None,
        reset_tokens_s: float | None,
    ) -> ExternalUsage:
        """Learn from a response's ``x-ratelimit-remaining-*`` and ``-reset-*`` headers.

        When the provider reports less remaining than the window ending now implies
        (by more than :data:`OBSERVE_SLACK`), somebody else uses the key: external
        phantom entries are added for the shortfall, leaving the window when the
        provider says its window resets (after a full window if it does not say).
        Reservations already booked for slots that no longer fit move later; their
        holders find out when they confirm. Our own entries are never removed, and an
        observation already accounted for adds nothing, so repeating one is harmless.
        Returns what was added. Costs one script call, none when the reported
        remainders leave no room for external usage at all.
        """
        slack_requests = max(1, math.ceil(self.rpm * OBSERVE_SLACK))
        slack_tokens = max(1, math.ceil(self.tpm * OBSERVE_SLACK))
        requests = None if remaining_requests is None else max(0, remaining_requests)
        tokens = None if remaining_tokens is None else max(0, remaining_tokens)
        short_requests = requests is not None and self.rpm - requests > slack_requests
        short_tokens = tokens is not None and self.tpm - tokens > slack_tokens
        if not (short_requests or short_tokens):
            return ExternalUsage(requests=0, tokens=0)
        added = self._store.observe(
            uuid.uuid4().hex,
            rpm=self.rpm,
            tpm=self.tpm,
            remaining_requests=requests,
            remaining_tokens=tokens,
            reset_requests_ms=_reset_ms(reset_requests_s, self._window_ms),
            reset_tokens_ms=_reset_ms(reset_tokens_s, self._window_ms),
            slack_requests=slack_requests,
            slack_tokens=slack_tokens,
            interactive_cap=self._cap,
            interactive_reserve=self._reserve,
        )
        return ExternalUsage(requests=added[0], tokens=added[1])

    def usage(self) -> WindowUsage:
        """Requests and tokens in the window ending now (later slots excluded).

        Seeded history and external phantoms count: this is the window the bucket
        admits against.
        """
        logged = self._store.usage()
        return WindowUsage(
            requests=logged.requests,
            tokens=logged.tokens,
            external_requests=logged.external_requests,
            external_tokens=logged.external_tokens,
        )


def _ms_until(deadline: float) -> int:
    """Whole milliseconds left until the monotonic ``deadline``, never negative."""
    return max(0, math.floor((deadline - time.monotonic()) * 1000))


def _reset_ms(seconds: float | None, window_ms: int) -> int | None:
    """A reset header in ms, capped at one window; ``None`` if absent or unreadable."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(math.ceil(seconds * 1000), window_ms)
