"""The exceptions a model call can end in, one tree under :class:`ModelError`.

:class:`~worker.client.ModelClient` turns every outcome into either a
:class:`~worker.responses.Completion` or one exception from this tree::

    ModelError                 base: .kind, .status, .retryable, .request_id, .rate_limits,
                               .body (the provider's JSON error body, if any)
    ├── RateLimited            429; .retry_after seconds (or None); retryable
    ├── ServerError            5xx, 408, 409; retryable
    ├── RequestRejected        any other 4xx (and 1xx/3xx); not retryable
    ├── AuthFailed             401, 403; not retryable (callers open a circuit)
    ├── Timeout                connect/read/write/pool timeout; retryable
    ├── ConnectionFailed       refused/reset connection, protocol error; retryable
    └── MalformedResponse      2xx without JSON, choices[0].message or usage; retryable;
                               .usage when the body still had parsable usage

Errors are classified by HTTP status only: a 429 body may say ``"code": 429``,
``"code": "rate_limit_exceeded"`` or anything else, and none of that matters.

``str(error)`` is a short message that is safe to store: it never contains the
inference key (httpx exceptions carry the request, so they are never chained or
quoted raw; the provider's text is redacted and cut to about 500 characters).

A 2xx whose ``usage`` is missing or invalid is a :class:`MalformedResponse`
even when the message itself is fine: the ledger settles the token budget from
``usage``, and a retry is cheaper than a silently wrong account.

``RateLimited.retry_after`` comes from ``Retry-After`` when present, otherwise
from ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``: the larger
reset among the exhausted limits (remaining 0), or the larger of both when
neither is known to be exhausted; ``None`` when no header says anything.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from worker.reported import RateLimitInfo, Usage

ErrorKind = Literal[
    "error",
    "rate_limited",
    "server_error",
    "rejected",
    "auth",
    "timeout",
    "connection",
    "malformed",
]


class ModelError(Exception):
    """A model call that did not produce a usable completion.

    Only the message is passed to ``Exception``, so the error pickles and
    survives Celery's result serialization; the remaining attributes travel in
    ``__dict__``.
    """

    kind: ClassVar[ErrorKind] = "error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        rate_limits: RateLimitInfo | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id
        self.rate_limits = rate_limits
        #: The provider's JSON error body (the key redacted), when it sent one.
        self.body = body

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message,), self.__dict__)


# The subclasses are named for what happened, httpx-style, not with an "Error" suffix.
class RateLimited(ModelError):  # noqa: N818
    """HTTP 429; ``retry_after`` is the provider's suggested wait in seconds."""

    kind: ClassVar[ErrorKind] = "rate_limited"
    retryable: ClassVar[bool] = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        request_id: str | None = None,
        rate_limits: RateLimitInfo | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id, rate_limits=rate_limits)
        self.retry_after = retry_after


class ServerError(ModelError):
    """HTTP 5xx, 408 or 409: the provider failed, trying again may work."""

    kind: ClassVar[ErrorKind] = "server_error"
    retryable: ClassVar[bool] = True


class RequestRejected(ModelError):  # noqa: N818
    """The provider refused this request (4xx other than 401/403/408/409/429)."""

    kind: ClassVar[ErrorKind] = "rejected"
    retryable: ClassVar[bool] = False


class AuthFailed(ModelError):  # noqa: N818
    """HTTP 401 or 403: the key is wrong or lacks access; no request will pass."""

    kind: ClassVar[ErrorKind] = "auth"
    retryable: ClassVar[bool] = False


class Timeout(ModelError):  # noqa: N818
    """The connect, read, write or pool timeout expired."""

    kind: ClassVar[ErrorKind] = "timeout"
    retryable: ClassVar[bool] = True


class ConnectionFailed(ModelError):  # noqa: N818
    """The connection was refused, reset or broke the HTTP protocol."""

    kind: ClassVar[ErrorKind] = "connection"
    retryable: ClassVar[bool] = True


class MalformedResponse(ModelError):  # noqa: N818
    """A 2xx body that is not JSON or lacks ``choices[0].message`` or ``usage``.

    ``usage`` is set when the body still reported valid token counts, so the
    ledger can charge tokens the provider did spend.
    """

    kind: ClassVar[ErrorKind] = "malformed"
    retryable: ClassVar[bool] = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        rate_limits: RateLimitInfo | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id, rate_limits=rate_limits)
        self.usage = usage
