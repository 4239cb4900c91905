"""What a provider's answer reports besides the completion: token usage and rate limits.

Plain values, shared by :mod:`worker.responses` (which reads them from an answer) and
:mod:`worker.errors` (whose exceptions carry them when a call fails).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """Token counts reported by the provider for one completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class RateLimitInfo:
    """The ``x-ratelimit-*`` headers of one response; ``None`` where absent or unreadable."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
