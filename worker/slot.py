"""One call's place in the throttle's bucket, from the grant to the answer.

The runner holds a :class:`Slot` around the ledger row and the HTTP call::

    slot = pool.take(price, priority=..., max_wait=..., stop=...)   # worker.pool
    with slot:
        ...                      # leave without calling: the slot is given back
        slot.sending()           # the call starts now (again once its bytes are out)
        ...                      # then exactly one of:
        slot.answered(charge, limits)      # settle at what the provider charged
        slot.failed(exc)                   # a 429 pauses the bucket, a 401 gives back

Every step after the grant is bookkeeping: with Redis away it is skipped and logged
(:func:`worker.outages.quietly`), never allowed to undo a call already made.
"""

from __future__ import annotations

from functools import partial
from types import TracebackType

from worker.errors import AuthFailed, ModelError, RateLimited
from worker.outages import quietly
from worker.reported import RateLimitInfo
from worker.throttle import Admission, Throttle


class Slot:
    """A granted slot; see the module docstring for the order of its steps."""

    def __init__(self, throttle: Throttle, admission: Admission) -> None:
        self.throttle = throttle
        self.admission = admission
        self._sent = False
        self._done = False

    @property
    def tokens(self) -> int:
        """Tokens reserved for the call."""
        return self.admission.tokens

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
            quietly("release", partial(self.throttle.release, self.admission))

    def sending(self) -> None:
        """The call starts now; called again once its bytes are out. A call that starts
        late is logged at its real start (:meth:`Throttle.starting`), since the
        provider counts it from its arrival: before the send it admits itself again,
        after it it is moved there at once."""
        late = quietly("restamp", partial(self.throttle.starting, self.admission, sent=self._sent))
        self._sent = True
        self.admission = late or self.admission

    def answered(self, charge: int, limits: RateLimitInfo | None) -> None:
        """The provider answered and charged ``charge`` tokens; it reported ``limits``."""
        self._done = True
        limits = limits or RateLimitInfo()
        # The headers show what others use (someone else may share the key); an answer
        # without them still lets a room grown by 429s shrink.
        remaining = (limits.remaining_requests, limits.remaining_tokens)
        quietly("settle", partial(self.throttle.settle, self.admission, charge, remaining))
        quietly("reprice", self.throttle.reprice)

    def failed(self, exc: ModelError) -> None:
        """The call failed with ``exc``.

        A 429: somebody else took our place in the provider's window, so the call
        stays logged in ours, every worker on the bucket waits for the reset the
        provider gave, and the room for others grows. A rejected key: the provider
        counted nothing, so the call leaves the log. Any other error keeps the whole
        reservation (the provider may have charged it).
        """
        self._done = True
        limits = exc.rate_limits or RateLimitInfo()
        remaining = (limits.remaining_requests, limits.remaining_tokens)
        if isinstance(exc, RateLimited):
            refused = partial(self.throttle.refused, self.admission, exc.retry_after, *remaining)
            quietly("refused", refused)
        elif isinstance(exc, AuthFailed):
            quietly("release", partial(self.throttle.release, self.admission, remaining))
        else:
            quietly("observe", partial(self.throttle.observe, self.admission, *remaining))
