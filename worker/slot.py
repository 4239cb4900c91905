"""One call's place in the throttle's bucket, from the grant to the answer.

The runner holds a :class:`Slot` around the ledger row and the HTTP call::

    slot = take(throttle, price, priority=..., max_wait=..., stop=...)
    with slot:
        ...                      # leave without calling: the slot is given back
        slot.sending()           # the call starts now (again once its bytes are out)
        ...                      # then exactly one of:
        slot.answered(charge, limits)      # settle at what the provider charged
        slot.failed(exc, pause_s)          # a 429 pauses the bucket, a 401 gives back

Every step after the grant is bookkeeping: with Redis away it is skipped and logged
(:func:`worker.outages.quietly`), never allowed to undo a call already made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from types import TracebackType

from worker.errors import AuthFailed, ModelError, RateLimited
from worker.outages import quietly
from worker.reported import RateLimitInfo
from worker.throttle import Reservation, Throttle


def take(
    throttle: Throttle,
    price: Callable[[], int],
    *,
    priority: int,
    max_wait: float,
    stop: threading.Event,
) -> Slot:
    """Wait for a slot in ``throttle``'s bucket for a request of ``price()`` tokens.

    Raises what :meth:`Throttle.acquire` raises: RequestTooLarge, ThrottleTimeout,
    ThrottleInterrupted, or a Redis error.
    """
    reservation = throttle.acquire(price, max_wait=max_wait, stop=stop, priority=priority)
    return Slot(throttle, reservation)


class Slot:
    """A granted slot; see the module docstring for the order of its steps."""

    def __init__(self, throttle: Throttle, reservation: Reservation) -> None:
        self.throttle = throttle
        self.reservation = reservation
        self._sent = False
        self._done = False

    @property
    def tokens(self) -> int:
        """Tokens reserved for the call."""
        return self.reservation.tokens

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._sent and not self._done:
            self._done = True
            quietly("release", partial(self.throttle.release, self.reservation))

    def sending(self) -> None:
        """The call starts now: a slot whose call is late moves to now
        (:meth:`Throttle.starting`), since the provider counts a call from its arrival.

        Called before the request and again once its bytes are out: with a whole
        window's calls starting in one process, a thread can wait for the CPU between.
        """
        self._sent = True
        moved = quietly("restamp", partial(self.throttle.starting, self.reservation))
        self.reservation = moved or self.reservation

    def answered(self, charge: int, limits: RateLimitInfo | None) -> None:
        """The provider answered and charged ``charge`` tokens; it reported ``limits``."""
        self._done = True
        quietly("settle", partial(self.throttle.settle, self.reservation, charge))
        quietly("observe", partial(_observe, self.throttle, limits))

    def failed(self, exc: ModelError, pause_s: float) -> None:
        """The call failed with ``exc``.

        A 429: somebody else took our place in the provider's window, so the slot
        stays taken in ours and every worker on the bucket waits ``pause_s``. A
        rejected key: the provider counted nothing, so the slot is given back. Any
        other error keeps the whole reservation (the provider may have charged it).
        """
        self._done = True
        if isinstance(exc, RateLimited):
            quietly("refused", partial(self.throttle.refused, self.reservation))
            quietly("pause", partial(self.throttle.pause, pause_s))
        elif isinstance(exc, AuthFailed):
            quietly("release", partial(self.throttle.release, self.reservation))
        quietly("observe", partial(_observe, self.throttle, exc.rate_limits))


def _observe(throttle: Throttle, limits: RateLimitInfo | None) -> None:
    """Let the bucket see what the provider says is left (someone else may share the key)."""
    if limits is not None:
        throttle.observe(
            limits.remaining_requests,
            limits.remaining_tokens,
            limits.reset_requests_s,
            limits.reset_tokens_s,
        )
