"""HTTP client for an OpenAI-compatible ``/v1/chat/completions`` endpoint.

One :class:`ModelClient` owns one pooled ``httpx.Client`` and turns every
outcome into either a :class:`Completion` or one exception from this tree::

    ModelError                 base: .kind, .status, .retryable, .request_id, .rate_limits
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

import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Literal

import httpx

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

USER_AGENT = "batch-infer/0.1"
CHAT_PATH = "/v1/chat/completions"
#: Longest piece of provider text kept in an error message.
MAX_PROVIDER_TEXT = 500
#: Idle keep-alive connections are dropped after this many seconds.
KEEPALIVE_EXPIRY_S = 30.0
_REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-amzn-requestid")
_REDACTED = "[redacted]"


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


@dataclass(frozen=True)
class Completion:
    """A successful chat completion with the fields callers store."""

    body: dict[str, Any]
    output_text: str | None
    reasoning_text: str | None
    tool_calls: list[Any] | None
    finish_reason: str | None
    usage: Usage
    request_id: str | None
    status: int
    latency_s: float
    rate_limits: RateLimitInfo | None


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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id
        self.rate_limits = rate_limits

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


# --- header parsing ---------------------------------------------------------

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_SECONDS = re.compile(_NUMBER)
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(value: str) -> float | None:
    """Read a duration such as ``51s``, ``250ms``, ``1m30s`` or ``12.5`` as seconds.

    Go-style unit sequences (the form the ``x-ratelimit-reset-*`` headers use)
    and plain non-negative numbers of seconds are accepted; anything else,
    including negative values, gives ``None``.
    """
    text = value.strip().lower()
    if not text:
        return None
    if _PLAIN_SECONDS.fullmatch(text):
        return float(text)
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total


def _parse_count(value: str | None) -> int | None:
    if value is None or not _PLAIN_SECONDS.fullmatch(value.strip()):
        return None
    return int(float(value))


def parse_rate_limit_headers(headers: httpx.Headers) -> RateLimitInfo | None:
    """Collect the ``x-ratelimit-*`` headers; ``None`` when none is present and readable."""
    info = RateLimitInfo(
        limit_requests=_parse_count(headers.get("x-ratelimit-limit-requests")),
        remaining_requests=_parse_count(headers.get("x-ratelimit-remaining-requests")),
        limit_tokens=_parse_count(headers.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_parse_count(headers.get("x-ratelimit-remaining-tokens")),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests", "")),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens", "")),
    )
    return None if info == RateLimitInfo() else info


def _parse_retry_after(value: str | None) -> float | None:
    """Read ``Retry-After`` as seconds (a number, a duration or an HTTP date)."""
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _retry_after(headers: httpx.Headers, limits: RateLimitInfo | None) -> float | None:
    explicit = _parse_retry_after(headers.get("retry-after"))
    if explicit is not None:
        return explicit
    if limits is None:
        return None
    pairs = [
        (limits.reset_requests_s, limits.remaining_requests),
        (limits.reset_tokens_s, limits.remaining_tokens),
    ]
    known = [(reset, left) for reset, left in pairs if reset is not None]
    exhausted = [reset for reset, left in known if left is not None and left <= 0]
    if exhausted:
        return max(exhausted)
    return max((reset for reset, _ in known), default=None)


def _request_id(headers: httpx.Headers) -> str | None:
    for name in _REQUEST_ID_HEADERS:
        value: str | None = headers.get(name)
        if value:
            return value[:200]
    return None


# --- message hygiene --------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def _clean(text: str, secret: str | None, limit: int = MAX_PROVIDER_TEXT) -> str:
    """Collapse whitespace, drop the key wherever it appears and cut to ``limit``."""
    if secret:
        text = text.replace(secret, _REDACTED)
    text = "".join(ch for ch in text if ch.isprintable() or ch.isspace())
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    # A second pass catches a key that whitespace collapsing or cutting re-joined.
    if secret:
        text = text.replace(secret, _REDACTED)
    return text


def _error_message(data: object, secret: str | None) -> str | None:
    """The provider's own error message in a decoded body, if it has one."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    message: object = None
    label: object = None
    if isinstance(error, dict):
        message = error.get("message")
        label = error.get("type") or error.get("code")
    elif isinstance(error, str):
        message = error
    if message is None:
        message = data.get("message") or data.get("detail")
    if not isinstance(message, str) or not message.strip():
        return None
    if isinstance(label, str | int) and not isinstance(label, bool):
        message = f"{label}: {message}"
    return _clean(message, secret)


def _provider_text(content: bytes, secret: str | None) -> str:
    """The provider's error message from a raw body, or a short snippet of the body."""
    message = _error_message(_load_json(content), secret)
    if message is not None:
        return message
    snippet = content[: MAX_PROVIDER_TEXT * 4].decode("utf-8", errors="replace")
    return _clean(snippet, secret) or "(empty body)"


_NOT_JSON = object()


def _load_json(content: bytes) -> object:
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return _NOT_JSON


# --- completion parsing -----------------------------------------------------


def _as_count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _parse_usage(value: object) -> Usage | None:
    """Valid usage, or ``None``; a missing ``total_tokens`` is the sum of the others."""
    if not isinstance(value, dict):
        return None
    prompt = _as_count(value.get("prompt_tokens"))
    completion = _as_count(value.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    raw_total = value.get("total_tokens")
    total = prompt + completion if raw_total is None else _as_count(raw_total)
    if total is None:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def _text_of(value: object) -> str | None:
    """A string as-is, or the concatenated text parts of a content-part list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return None


def _reasoning_of(message: Mapping[str, Any]) -> str | None:
    for field in ("reasoning", "reasoning_content"):
        text = _text_of(message.get(field))
        if text:
            return text
    return None


def _parse(
    body: object,
    *,
    status: int,
    request_id: str | None,
    latency_s: float,
    rate_limits: RateLimitInfo | None,
    secret: str | None,
) -> Completion:
    def malformed(problem: str, usage: Usage | None = None) -> MalformedResponse:
        return MalformedResponse(
            f"HTTP {status} with unusable body: {problem}",
            status=status,
            request_id=request_id,
            rate_limits=rate_limits,
            usage=usage,
        )

    if not isinstance(body, dict):
        raise malformed(f"expected a JSON object, got {type(body).__name__}")
    usage = _parse_usage(body.get("usage"))
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        problem = "no choices[0]"
        provider = _error_message(body, secret)
        if provider is not None:
            problem += f" ({provider})"
        raise malformed(problem, usage)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise malformed("no choices[0].message", usage)
    content = message.get("content")
    output_text = _text_of(content)
    if content is not None and output_text is None:
        raise malformed(f"choices[0].message.content is a {type(content).__name__}", usage)
    if usage is None:
        raise malformed("missing or invalid usage (needed for the token ledger)")
    tool_calls = message.get("tool_calls")
    finish_reason = choice.get("finish_reason")
    return Completion(
        body=body,
        output_text=output_text,
        reasoning_text=_reasoning_of(message),
        tool_calls=tool_calls if isinstance(tool_calls, list) else None,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        usage=usage,
        request_id=request_id,
        status=status,
        latency_s=latency_s,
        rate_limits=rate_limits,
    )


def parse_completion(
    body: object,
    *,
    status: int,
    request_id: str | None,
    latency_s: float,
    rate_limits: RateLimitInfo | None,
) -> Completion:
    """Turn a decoded 2xx body into a :class:`Completion`; raise :class:`MalformedResponse`."""
    return _parse(
        body,
        status=status,
        request_id=request_id,
        latency_s=latency_s,
        rate_limits=rate_limits,
        secret=None,
    )


# --- the client -------------------------------------------------------------


def default_timeout(connect: float, read: float) -> httpx.Timeout:
    """Explicit timeouts: ``read`` for the response, ``connect`` for everything else.

    Write and pool use the connect value: a socket write that stalls that long
    means a dead peer, and waiting that long for a pooled connection means the
    pool is too small, which should surface as a retryable :class:`Timeout`.
    """
    if connect <= 0 or read <= 0:
        raise ValueError("timeouts must be positive")
    return httpx.Timeout(connect=connect, read=read, write=connect, pool=connect)


_TIMEOUT_PHASES: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)


class ModelClient:
    """Sends chat-completion requests over one shared, pooled ``httpx.Client``.

    Safe to share between threads. Redirects are not followed, so the key is
    only ever sent to ``base_url``.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout: httpx.Timeout,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 200,
    ) -> None:
        url = httpx.URL(base_url.rstrip("/") + CHAT_PATH)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("base_url must be an absolute http:// or https:// URL")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._url = url
        self._secret = key
        self._timeout = timeout
        self._http = httpx.Client(
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"ModelClient(url={str(self._url)!r})"

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections; the client is unusable afterwards."""
        self._http.close()

    def chat(self, body: Mapping[str, Any]) -> Completion:
        """POST ``body`` to ``/v1/chat/completions``; raise a :class:`ModelError` subclass.

        Errors are raised outside any ``except`` block so that no httpx
        exception (which holds the request and its headers) is attached as
        ``__cause__`` or ``__context__``.
        """
        payload = _encode(body)
        if isinstance(payload, ModelError):
            raise payload
        started = time.monotonic()
        outcome = self._send(payload)
        if isinstance(outcome, ModelError):
            raise outcome
        latency = time.monotonic() - started
        return self._interpret(outcome, latency)

    def _send(self, payload: bytes) -> httpx.Response | ModelError:
        try:
            return self._http.post(self._url, content=payload)
        except httpx.TimeoutException as exc:
            return self._timeout_error(exc)
        except httpx.DecodingError as exc:
            return MalformedResponse(f"response body could not be decoded ({type(exc).__name__})")
        except httpx.RequestError as exc:
            detail = _clean(str(exc), self._secret, limit=200)
            suffix = f": {detail}" if detail else ""
            return ConnectionFailed(f"connection failed ({type(exc).__name__}){suffix}")

    def _timeout_error(self, exc: httpx.TimeoutException) -> Timeout:
        phase = next((name for cls, name in _TIMEOUT_PHASES if isinstance(exc, cls)), "request")
        limit = getattr(self._timeout, phase, None)
        after = f" after {limit:g}s" if isinstance(limit, int | float) else ""
        return Timeout(f"{phase} timeout{after} waiting for the inference endpoint")

    def _interpret(self, response: httpx.Response, latency_s: float) -> Completion:
        status = response.status_code
        headers = response.headers
        request_id = _request_id(headers)
        limits = parse_rate_limit_headers(headers)
        if 200 <= status < 300:
            body = _load_json(response.content)
            if body is _NOT_JSON:
                snippet = _clean(response.content[:200].decode("utf-8", "replace"), self._secret)
                raise MalformedResponse(
                    f"HTTP {status} with unusable body: not JSON ({snippet or 'empty'})",
                    status=status,
                    request_id=request_id,
                    rate_limits=limits,
                )
            return _parse(
                body,
                status=status,
                request_id=request_id,
                latency_s=latency_s,
                rate_limits=limits,
                secret=self._secret,
            )
        raise self._http_error(response, request_id, limits)

    def _http_error(
        self, response: httpx.Response, request_id: str | None, limits: RateLimitInfo | None
    ) -> ModelError:
        status = response.status_code
        text = _provider_text(response.content, self._secret)
        where = f" [request id {request_id}]" if request_id else ""
        if status == 429:
            wait = _retry_after(response.headers, limits)
            hint = f"; retry after {wait:g}s" if wait is not None else ""
            return RateLimited(
                f"HTTP 429 rate limited{hint}: {text}{where}",
                request_id=request_id,
                rate_limits=limits,
                retry_after=wait,
            )
        cls = _class_for_status(status)
        prefix = f"HTTP {status}"
        if 300 <= status < 400:
            prefix += " (redirects are not followed)"
        return cls(
            f"{prefix}: {text}{where}", status=status, request_id=request_id, rate_limits=limits
        )


def _class_for_status(status: int) -> type[ModelError]:
    if status in (401, 403):
        return AuthFailed
    if status in (408, 409) or 500 <= status < 600:
        return ServerError
    return RequestRejected


def _encode(body: Mapping[str, Any]) -> bytes | ModelError:
    try:
        text = json.dumps(dict(body), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        return RequestRejected(f"request body is not valid JSON: {_clean(str(exc), None, 200)}")
    return text.encode("utf-8")
