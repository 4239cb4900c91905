"""Global rate limiter shared by every worker thread, process and dyno using one key.

The provider counts requests (rpm) and tokens (tpm) over a sliding 60 s window. The
throttle has these concepts, and no others:

1. **Bucket**: model plus key fingerprint; every process on that key shares its
   Redis keys (:mod:`worker.throttle_scripts`).
2. **Log**: each admitted call with its Redis time and cost. A call fits when the
   window ending now, with it, stays within the limits; the window is 60 s plus a
   margin, for calls that reach the provider a little after their admission.
3. **Admit now**: one script admits a call at once or says how long to wait;
   nothing is booked ahead, so nothing is ever moved.
4. **Price**: a call is priced (``price()``) each time it asks, and the calls in
   flight again after each answer.
5. **Pace**: where requests bind, calls take turns one window / limit apart: bulk
   waits for its turn, interactive takes the next one at once. Where tokens bind,
   bulk starts as soon as tokens are free.
6. **Precedence**: while an interactive call waits for room, bulk waits too; bulk
   also leaves ``interactive_reserve`` requests (and that share of tpm) free.
7. **Room for others**: requests and tokens we leave to other clients of the key,
   learnt from the provider's headers and our 429s (:func:`next_room`); ``floor``
   is its minimum.
8. **Settle**: an answered call is charged what it cost; a call never sent leaves
   the log.
9. **Pause**: a 429 pauses the bucket until the provider's reset.
10. **Seed**: a lost log (Redis restart, flush, idle window) is rebuilt from the
    ledger's calls of the last window before anything is admitted.

In each process one thread per priority asks Redis at a time, so a backlog of
threads costs one script call per turn. :func:`acquire_first` asks the buckets of
a pool of keys (:mod:`worker.pool`) in turn; :meth:`Throttle.acquire` is that with
one bucket.

Errors::

    ThrottleError            base class of everything raised here on purpose
    +-- RequestTooLarge      one request costs more than the whole tpm budget
    +-- ThrottleTimeout      not admitted within ``max_wait``
    +-- ThrottleInterrupted  the ``stop`` event was set while waiting
    +-- NoBucket             every bucket the caller may use is set aside

Redis failures and failures of ``seed`` propagate unchanged, so that callers can
retry the task; a call they strand only costs capacity until it leaves the window.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis

from jobs.models import Priority
from worker.throttle_scripts import AGAIN, NEW, SENT, BucketStore, Mode, Room

#: Longest ``max_wait`` taken literally; ``math.inf`` means "a long time".
_LONGEST_WAIT_S = 1e9
#: Longest a waiting thread goes without looking at its ``stop`` event (s).
_STOP_CHECK_S = 1.0
#: Longest the asking thread sleeps before asking again (s): the wait it is told
#: counts only calls leaving the window, and answers settled meanwhile free tokens.
POLL_S = 0.25
#: How late (ms) a call may start after its admission before it admits itself
#: again. The worker passes half its window margin.
LATE_START_MS = 100
#: Room for others changes by this share of a limit at a time.
ROOM_STEP = 0.02
#: Room for others never exceeds this share of a limit.
ROOM_MAX = 0.5
#: Without headers, a 429-grown room shrinks a step after this long without one (ms),
#: and the room is forgotten this many windows after its last change.
ROOM_DECAY_MS = 60_000
ROOM_KEEP_WINDOWS = 10

#: What a ``seed`` callable returns: ``(age in seconds, tokens)`` per call admitted in
#: the last window.
History = Sequence[tuple[float, int]]


class ThrottleError(Exception):
    """Base class of the throttle's own errors."""


# The names are the interface the callers catch; they read better without "Error".
class RequestTooLarge(ThrottleError):  # noqa: N818
    """A single request needs more tokens than the per-window budget allows."""


class ThrottleTimeout(ThrottleError):  # noqa: N818
    """The call was not admitted within the time the caller agreed to wait."""


class ThrottleInterrupted(ThrottleError):  # noqa: N818
    """The caller's stop event was set while waiting."""


class NoBucket(ThrottleError):  # noqa: N818
    """Every bucket the caller may use is set aside (a pool whose keys are rejected)."""


@dataclass(frozen=True)
class Admission:
    """An admitted call: its id in the log, its cost, Redis time of the admission and
    the local monotonic clock then (together they tell how late the call starts)."""

    id: str
    tokens: int
    at_ms: int
    at: float
    #: Our requests and tokens in the provider's window at the admission, this call's
    #: included: what the provider's headers on its answer are compared with.
    ours: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class WindowUsage:
    """Requests and tokens of our calls in the window ending now."""

    requests: int
    tokens: int


@dataclass(frozen=True)
class ThrottleStats:
    """What one :class:`Throttle` instance did so far: calls admitted, Redis commands sent."""

    admitted: int
    redis_round_trips: int


@dataclass(frozen=True)
class Turnstiles:
    """One lock per priority: the thread holding it is the one asking Redis."""

    bulk: threading.Lock = field(default_factory=threading.Lock)
    interactive: threading.Lock = field(default_factory=threading.Lock)


def acquire_first(
    buckets: Callable[[], Sequence[Throttle]],
    tokens: Callable[[], int],
    *,
    turnstiles: Turnstiles,
    max_wait: float = 3000.0,
    stop: threading.Event | None = None,
    priority: int = Priority.BULK,
) -> tuple[Throttle, Admission]:
    """Block until one of the throttles ``buckets()`` names admits a call priced
    ``tokens()``; the first asked that has room takes it.

    ``buckets()`` is read again at every pass (its caller may set a bucket aside
    meanwhile), and each bucket is asked again only once the wait it told has passed,
    or :data:`POLL_S`, so that several buckets cost no more asking than one each.
    Raises as :meth:`Throttle.acquire` does; :class:`RequestTooLarge` only when the call
    is too large for every bucket, and :class:`NoBucket` when ``buckets()`` is empty.
    """
    interactive = Priority(priority) is Priority.INTERACTIVE
    kind, rid = ("i." if interactive else "b."), uuid.uuid4().hex
    deadline = time.monotonic() + min(max(max_wait, 0.0), _LONGEST_WAIT_S)
    where = _where(buckets())
    turnstile = turnstiles.interactive if interactive else turnstiles.bulk
    # Queued behind this process's asking thread; never past the deadline.
    while not turnstile.acquire(timeout=min(_STOP_CHECK_S, _left(deadline))):
        _check(where, stop, deadline, wait_s=0.0)
    try:
        # Per bucket: when to ask it again, and when it said it may admit.
        ask_at: dict[str, float] = {}
        told_at: dict[str, float] = {}
        too_large: RequestTooLarge | None = None
        while True:
            current = buckets()
            where = _where(current)
            # Only the stop event here: the deadline is checked before each wait, so
            # a call with no time to wait (max_wait <= 0) still asks once.
            _check(where, stop, math.inf, wait_s=0.0)
            for throttle in current:
                if ask_at.get(throttle.bucket, 0.0) > time.monotonic():
                    continue
                try:
                    got = throttle.ask(kind, rid, tokens, NEW)
                except RequestTooLarge as exc:
                    too_large, ask_at[throttle.bucket] = exc, math.inf
                    continue
                if isinstance(got, Admission):
                    throttle.hold(got, tokens)
                    return throttle, got
                assert got is not None
                now = time.monotonic()
                ask_at[throttle.bucket] = now + min(got, POLL_S)
                told_at[throttle.bucket] = now + got
            told = [told_at[t.bucket] for t in current if ask_at[t.bucket] < math.inf]
            if not told:
                assert too_large is not None
                raise too_large
            _check(where, stop, deadline, wait_s=min(told) - time.monotonic())
            pause = min(ask_at[t.bucket] for t in current) - time.monotonic()
            if pause > 0:
                if stop is None:
                    time.sleep(pause)
                else:
                    stop.wait(pause)
    finally:
        turnstile.release()


def _where(throttles: Sequence[Throttle]) -> str:
    """The buckets named in an error message."""
    if not throttles:
        raise NoBucket("every bucket the call may use is set aside")
    return ", ".join(t.bucket for t in throttles)


def _check(where: str, stop: threading.Event | None, deadline: float, *, wait_s: float) -> None:
    if stop is not None and stop.is_set():
        raise ThrottleInterrupted(f"stop requested while waiting on bucket {where}")
    if time.monotonic() + wait_s > deadline:
        raise ThrottleTimeout(
            f"bucket {where} admits nothing for {wait_s:.1f} s, beyond the time left to wait"
        )


def no_history() -> list[tuple[float, int]]:
    """A ``seed`` for a bucket known to have had no calls in the last window (tests)."""
    return []


def next_room(
    room: int, *, limit: int, seen: int | None, refused: bool, idle_ms: int
) -> int | None:
    """The room to leave others in one limit, or ``None`` to keep ``room`` as it is.

    ``seen`` is the others' usage in the provider's window, as its headers on one of
    our answers showed it (its count less ours), or ``None`` without headers;
    ``refused``: our call was answered 429; ``idle_ms``: time since ``room`` last
    changed. Less than half a step counts as nothing: our reservation of a call
    can fall a few tokens short of the provider's count. While the others use all
    the room we leave, it grows to a step above their use, so that they can go on
    growing into it; when they use less, it shrinks a step per answer towards that
    (towards nothing once they are gone). A 429 means someone took our place: grow
    two steps. Without headers nothing shows the others leaving, so a grown room
    shrinks a step per :data:`ROOM_DECAY_MS`.
    """
    step = max(1, math.ceil(limit * ROOM_STEP))
    most = math.floor(limit * ROOM_MAX)
    if refused:
        return min(most, room + 2 * step)
    if seen is None:
        return max(0, room - step) if room and idle_ms >= ROOM_DECAY_MS else None
    seen = seen if 2 * seen >= step else 0
    if seen >= max(1, room):
        return min(most, seen + step)
    target = seen + step if seen else 0
    if room > target:
        return max(target, room - step)
    return None


class Throttle:
    """Admit calls for one bucket within rpm and tpm; see the module docstring.

    ``bucket`` is an opaque label such as ``"kimi-k2-5:ab12cd34ef56"``, never the key
    itself. ``window_s`` is the provider's window; the log keeps calls ``margin_s``
    longer. Every client of a bucket must use the same limits, window, margin,
    reserve and floor. One instance is safe to share between threads.

    ``interactive_reserve`` is in requests; the same share of tpm is reserved with
    it. ``floor`` is the least share of each limit left to other clients of the key.
    ``seed`` returns the calls admitted during the last window (the worker reads
    them from its ledger); it is called when the log was lost.
    """

    def __init__(
        self,
        redis: redis.Redis,
        bucket: str,
        *,
        rpm: int,
        tpm: int,
        seed: Callable[[], History],
        window_s: float = 60.0,
        margin_s: float = 0.0,
        interactive_reserve: int = 0,
        floor: float = 0.0,
        late_start_ms: int = LATE_START_MS,
    ) -> None:
        if rpm < 1 or tpm < 1:
            raise ValueError(f"throttle limits must be positive, got rpm={rpm} tpm={tpm}")
        window_ms = round(window_s * 1000)
        if window_ms < 1 or margin_s < 0:
            raise ValueError(f"throttle window must be at least 1 ms, got {window_s} s")
        if not 0 <= interactive_reserve < rpm:
            raise ValueError(f"interactive_reserve must lie in [0, rpm), got {interactive_reserve}")
        if not 0.0 <= floor <= ROOM_MAX:
            raise ValueError(f"floor must lie in [0, {ROOM_MAX}], got {floor}")
        self.bucket = bucket
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_ms / 1000
        self._provider_window_ms = window_ms
        self._reserve = (interactive_reserve, math.ceil(interactive_reserve / rpm * tpm))
        self._floor = (math.ceil(floor * rpm), math.ceil(floor * tpm))
        self._late_start_ms = late_start_ms
        self._seed = seed
        self._store = BucketStore(redis, bucket, window_ms=window_ms + round(margin_s * 1000))
        # One thread per priority asks Redis at a time (see the module docstring).
        self._turnstiles = Turnstiles()
        # This process's calls in flight: id -> (tokens charged, price, admitted at, on
        # the monotonic clock), and one thread at a time pricing them again.
        self._held: dict[str, tuple[int, Callable[[], int], float]] = {}
        self._holding, self._repricing = threading.Lock(), threading.Lock()
        self._seeding = threading.Lock()
        self._admitted = 0

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
    ) -> Admission:
        """Block until a call costing ``tokens`` is admitted, and return its admission.

        ``tokens`` may be a callable, priced again at every try. Raises
        :class:`RequestTooLarge` at once if it exceeds tpm; :class:`ThrottleTimeout`
        when the call is not admitted within ``max_wait`` seconds (zero or less: only
        at once) or when the wait it is told exceeds what is left of it; and
        :class:`ThrottleInterrupted` once ``stop`` is set.
        """
        price = tokens if callable(tokens) else lambda: tokens
        return acquire_first(
            lambda: [self],
            price,
            turnstiles=self._turnstiles,
            max_wait=max_wait,
            stop=stop,
            priority=priority,
        )[1]

    def starting(self, admission: Admission, *, sent: bool = False) -> Admission:
        """Call right before sending, and again with ``sent`` once the request is out.

        The provider counts a call from when it arrives. A call starting more than
        ``late_start_ms`` after its admission admits itself again at its real start:
        it has had its turn, so it waits only if the window has no room left. One
        already sent is logged at once. Returns the admission to settle from then on.
        """
        late_ms = (time.monotonic() - admission.at) * 1000
        if late_ms <= self._late_start_ms:
            return admission
        kind, rid = admission.id[:2], admission.id[2:]
        with self._holding:
            tokens = self._held.get(admission.id, (admission.tokens,))[0]
        while True:
            again = self.ask(kind, rid, lambda: tokens, SENT if sent else AGAIN)
            if not isinstance(again, float):
                # None: the log was lost meanwhile, and the seed counts the call sent.
                return admission if again is None else again
            time.sleep(min(again, POLL_S))

    def hold(self, admission: Admission, price: Callable[[], int]) -> None:
        """Count a new admission among this process's calls in flight (priced again by
        :meth:`reprice` until settled)."""
        with self._holding:
            self._admitted += 1
            self._held[admission.id] = (admission.tokens, price, admission.at)

    def ask(
        self, kind: str, rid: str, price: Callable[[], int], mode: Mode
    ) -> Admission | float | None:
        """Ask once: the admission, or the seconds to wait before asking again; ``None``:
        a call already SENT found the log lost (the seed counts it already)."""
        while True:
            cost = self._check_cost(price())
            verdict = self._store.admit(
                kind + rid,
                cost,
                rpm=self.rpm,
                tpm=self.tpm,
                reserve=self._reserve,
                floor=self._floor,
                bulk=kind == "b.",
                span_ms=self._provider_window_ms,
                mode=mode,
            )
            if verdict.admitted:
                return Admission(kind + rid, cost, verdict.at_ms, time.monotonic(), verdict.ours)
            if not verdict.unseeded:
                return verdict.wait_ms / 1000
            if mode == SENT:
                return None
            self._seed_log()

    def _check_cost(self, tokens: int) -> int:
        if tokens < 0:
            raise ValueError(f"token cost must not be negative, got {tokens}")
        if tokens > self.tpm:
            raise RequestTooLarge(
                f"request needs {tokens} tokens but bucket {self.bucket} allows only "
                f"{self.tpm} tokens per {self.window_s:g} s; shrink the prompt or max_tokens"
            )
        return tokens

    def _seed_log(self) -> None:
        """Rebuild the lost log from the ``seed`` history; one thread per process reads it,
        and the script logs it only if no other process did meanwhile."""
        if not self._seeding.acquire(blocking=False):
            # Another thread (of the other priority) is reading it: wait for it, then
            # ask again; the log is whole by then unless that seed failed.
            with self._seeding:
                return
        try:
            window_ms = self._store.window_ms
            history = [
                (max(0, math.floor(age * 1000)), max(0, int(tokens)))
                for age, tokens in self._seed()
                if math.isfinite(age) and age * 1000 < window_ms
            ]
            self._store.seed(history)
        finally:
            self._seeding.release()

    def settle(
        self,
        admission: Admission,
        tokens: int,
        remaining: tuple[int | None, int | None] | None = None,
    ) -> None:
        """Charge ``tokens`` for an answered call instead of what it reserved. With
        ``remaining``, the answer's ``x-ratelimit-remaining-*`` requests and tokens
        (``None`` where absent), learn from them as :meth:`observe` does, in the same
        round trip."""
        if tokens < 0:
            raise ValueError(f"settled tokens must not be negative, got {tokens}")
        self._end(admission, tokens, remaining)

    def release(
        self, admission: Admission, remaining: tuple[int | None, int | None] | None = None
    ) -> None:
        """Take a call that the provider did not count (never sent, or refused its key) out
        of the log; with ``remaining``, learn from them as :meth:`settle` does."""
        self._end(admission, -1, remaining)

    def observe(
        self, admission: Admission, remaining_requests: int | None, remaining_tokens: int | None
    ) -> None:
        """Learn from the ``x-ratelimit-remaining-*`` headers (``None``: absent) of the
        answer to ``admission``: what the provider counted beyond our calls then is
        somebody else's."""
        self._end(admission, None, (remaining_requests, remaining_tokens))

    def _end(
        self,
        admission: Admission,
        tokens: int | None,
        remaining: tuple[int | None, int | None] | None,
        *,
        refused: bool = False,
    ) -> None:
        """Charge the call ``tokens`` (``-1``: take it out; ``None``: as it is); then, given
        ``remaining`` (see :meth:`observe`), learn the room for others."""
        with self._holding:
            self._held.pop(admission.id, None)
        changes = [] if tokens is None else [(admission.id, tokens, None)]
        # Our calls admitted just after this one may have reached the provider first;
        # they matter only to what a header shows, so without one, none are read.
        headers = remaining is not None and any(v is not None for v in remaining)
        within_ms = self._late_start_ms if headers else 0
        look = self._store.settle(changes, self._provider_window_ms, admission.at_ms, within_ms)
        if remaining is None:
            return
        room, idle_ms = look.room, look.now_ms - look.room.at_ms

        def learn(current: int, limit: int, left: int | None, ours: int) -> int | None:
            seen = None if left is None else max(0, limit - max(0, left) - ours)
            # A 429 says which limit ran out when it carries the headers.
            used_up = left is None or left < limit * ROOM_STEP
            return next_room(
                current, limit=limit, seen=seen, refused=refused and used_up, idle_ms=idle_ms
            )

        ours_r, ours_t = (a + b for a, b in zip(admission.ours, look.later, strict=True))
        requests = learn(room.requests, self.rpm, remaining[0], ours_r)
        learnt = learn(room.tokens, self.tpm, remaining[1], ours_t)
        if requests is None and learnt is None:
            return
        grown = Room(
            requests=room.requests if requests is None else requests,
            tokens=room.tokens if learnt is None else learnt,
            at_ms=look.now_ms,
        )
        self._store.set_room(grown, keep_ms=ROOM_KEEP_WINDOWS * self._store.window_ms)

    def reprice(self) -> None:
        """Charge this process's calls in flight their price now: an answer just taught the
        calibration, and a first window priced from the raw estimate fills at once."""
        if not self._repricing.acquire(blocking=False):
            return  # another thread is at it, with the same answers to go by
        try:
            gone = time.monotonic() - self._store.window_ms / 1000
            with self._holding:
                # A call out of the window costs nothing any more (one whose slot was
                # never given back, too: it is forgotten here).
                for rid in [rid for rid, held in self._held.items() if held[2] < gone]:
                    del self._held[rid]
                held = list(self._held.items())
            prices = [(rid, was, min(price(), self.tpm)) for rid, (was, price, _) in held]
            changed = [(rid, now, was) for rid, was, now in prices if now != was]
            if not changed:
                return
            self._store.settle(changed, self._provider_window_ms)
            with self._holding:
                for rid, now, _ in changed:
                    if rid in self._held:
                        self._held[rid] = (now, *self._held[rid][1:])
        finally:
            self._repricing.release()

    def refused(
        self,
        admission: Admission,
        reset_s: float | None,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
    ) -> None:
        """The provider refused an admitted call with a 429: somebody else took that
        place in its window. The call stays logged in its place, the room for others
        grows in each limit that the 429's headers show used up (in both without
        headers; see :func:`next_room`), and the bucket pauses until the provider's
        reset; without one, for the turns that the grown room takes to come free."""
        if reset_s is None:
            reset_s = 2 * max(1, math.ceil(self.rpm * ROOM_STEP)) * self.window_s / self.rpm
        self.pause(reset_s)
        self._end(admission, None, (remaining_requests, remaining_tokens), refused=True)

    def pause(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` from now (Redis time); a longer pause stays."""
        if seconds < 0:
            raise ValueError(f"pause must not be negative, got {seconds}")
        if math.ceil(seconds * 1000) > 0:
            self._store.pause(math.ceil(seconds * 1000))

    def paused_for(self) -> float:
        """Seconds until the bucket admits again because of a pause (0.0 if none)."""
        return self._store.settle([], self._provider_window_ms).pause_ms / 1000

    def room(self) -> Room:
        """The room currently learnt for other clients of the key (floor not included)."""
        return self._store.settle([], self._provider_window_ms).room

    def usage(self) -> WindowUsage:
        """Requests and tokens logged in the window ending now, seeded calls included."""
        look = self._store.settle([], self._store.window_ms)
        return WindowUsage(requests=look.requests, tokens=look.tokens)


def _left(deadline: float) -> float:
    """Seconds until the monotonic ``deadline``, never negative."""
    return max(0.0, deadline - time.monotonic())
