"""How long to wait before calling the model again after a failed attempt.

:meth:`RetryPolicy.delay` maps a :class:`~worker.errors.ModelError` and the
number of the attempt that just failed to a sleep in seconds, or ``None`` when
the job should fail for good:

- errors that are not retryable (rejected request, auth failure) give up at once;
- every kind gives up once ``max_attempts`` calls have been made, 429s included
  (a caller that wants rate limits not to count simply does not count them);
- a 429 waits ``retry_after`` plus up to 10% jitter, so workers told the same
  reset time do not all return in the same millisecond; without a hint it waits
  ``rate_limit_fallback`` (plus the same jitter);
- other retryable errors use "equal jitter" exponential backoff: with
  ``bound = min(cap, base * 2**(attempt - 1))``, uniform over ``[bound / 2, bound]``.
  The fixed half guarantees how long the retries span (at the defaults, 8 calls
  wait at least 61.5 s in all), so a provider outage shorter than that fails no
  job; the random half keeps workers from retrying in lockstep.

:meth:`RetryPolicy.fits` answers whether a sleep (plus the next call) still
ends before a deadline, e.g. the broker visibility timeout after which Redis
hands the task to another worker; a task that gets ``False`` should hand the
retry back to the queue instead of sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from jobs.settings import Settings
from worker.errors import ModelError, RateLimited

__all__ = ["RetryPolicy"]

#: Largest random extra added to a 429 wait, as a fraction of the wait.
RATE_LIMIT_JITTER = 0.1
#: Smallest backoff, as a fraction of ``base``.
FLOOR_FRACTION = 0.1
# 2**62 seconds dwarfs any cap; stopping there keeps the float math finite.
_MAX_EXPONENT = 62

_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff and give-up rules for model calls; all durations in seconds."""

    max_attempts: int = 8
    base: float = 1.0
    cap: float = 60.0
    rate_limit_fallback: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base <= 0 or self.cap <= 0:
            raise ValueError("base and cap must be positive")
        if self.rate_limit_fallback < 0:
            raise ValueError("rate_limit_fallback must not be negative")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy configured by INFERENCE_MAX_ATTEMPTS and INFERENCE_BACKOFF_*."""
        return cls(
            max_attempts=settings.max_attempts,
            base=settings.backoff_base,
            cap=settings.backoff_max,
        )

    @property
    def floor(self) -> float:
        """The shortest backoff ever returned."""
        return FLOOR_FRACTION * self.base

    def backoff_bound(self, attempt: int) -> float:
        """Upper bound of the jittered backoff after failed attempt ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError("attempt is 1-based")
        exponent = min(attempt - 1, _MAX_EXPONENT)
        return max(self.floor, min(self.cap, self.base * 2.0**exponent))

    def delay(
        self, error: ModelError, attempt: int, *, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up.

        ``attempt`` is the 1-based number of the attempt that just failed.
        """
        if attempt < 1:
            raise ValueError("attempt is 1-based")
        if not error.retryable or attempt >= self.max_attempts:
            return None
        r = rng if rng is not None else _RNG
        if isinstance(error, RateLimited):
            wait = error.retry_after if error.retry_after is not None else self.rate_limit_fallback
            return max(self.floor, wait + r.uniform(0.0, RATE_LIMIT_JITTER * wait))
        bound = self.backoff_bound(attempt)
        return max(self.floor, r.uniform(bound / 2, bound))

    def fits(self, delay: float, remaining_s: float, *, reserve_s: float = 0.0) -> bool:
        """Whether sleeping ``delay`` and then spending ``reserve_s`` ends within ``remaining_s``.

        ``remaining_s`` is the time left before a deadline such as the broker
        visibility timeout; ``reserve_s`` is what the next attempt may take
        (typically the read timeout).
        """
        return delay + reserve_s <= remaining_s
