"""The parts of a chat-completion response that callers keep, and how they are read.

:func:`parse_completion` turns a decoded 2xx body into a :class:`Completion`
or raises :class:`~worker.errors.MalformedResponse`; :func:`parse_rate_limit_headers`
and :func:`parse_duration` read the ``x-ratelimit-*`` headers. The remaining
helpers serve :class:`~worker.client.ModelClient`: the request id, the
``Retry-After`` wait and the provider's error text, redacted and cut short.
"""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from worker.errors import MalformedResponse
from worker.reported import RateLimitInfo, Usage

#: Longest piece of provider text kept in an error message.
MAX_PROVIDER_TEXT = 500
#: Largest provider error body kept whole, bytes.
MAX_PROVIDER_BODY = 64 * 1024
_REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-amzn-requestid")
_REDACTED = "[redacted]"


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


def retry_after_seconds(headers: httpx.Headers, limits: RateLimitInfo | None) -> float | None:
    """The wait a 429 asks for: ``Retry-After``, else the relevant ``x-ratelimit-reset-*``.

    Without ``Retry-After``, the larger reset among the exhausted limits
    (remaining 0) wins, or the larger of both when neither is known to be
    exhausted; ``None`` when no header says anything.
    """
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


def request_id_of(headers: httpx.Headers) -> str | None:
    """The provider's request id from the first header that carries one, cut to 200 characters."""
    for name in _REQUEST_ID_HEADERS:
        value: str | None = headers.get(name)
        if value:
            return value[:200]
    return None


# --- message hygiene --------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, secret: str | None, limit: int = MAX_PROVIDER_TEXT) -> str:
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
    return clean_text(message, secret)


def provider_text(content: bytes, secret: str | None) -> str:
    """The provider's error message from a raw body, or a short snippet of the body."""
    message = _error_message(load_json(content), secret)
    if message is not None:
        return message
    snippet = content[: MAX_PROVIDER_TEXT * 4].decode("utf-8", errors="replace")
    return clean_text(snippet, secret) or "(empty body)"


def provider_body(content: bytes, secret: str | None) -> dict[str, Any] | None:
    """The provider's error body as a JSON object, the key redacted; ``None`` if it is not one.

    Kept whole (an output line's ``response.body``) when it is small enough to store.
    """
    if len(content) > MAX_PROVIDER_BODY:
        return None
    data = load_json(content)
    if not isinstance(data, dict):
        return None
    text = json.dumps(data, ensure_ascii=False)
    if secret and secret in text:
        redacted = json.loads(text.replace(secret, _REDACTED))
        return redacted if isinstance(redacted, dict) else None
    return data


#: What :func:`load_json` returns for a body that is not JSON (``None`` is valid JSON).
NOT_JSON = object()


def load_json(content: bytes) -> object:
    """Decode a body as JSON, or return :data:`NOT_JSON`."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return NOT_JSON


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


def parse_completion(
    body: object,
    *,
    status: int,
    request_id: str | None,
    latency_s: float,
    rate_limits: RateLimitInfo | None,
    secret: str | None = None,
) -> Completion:
    """Turn a decoded 2xx body into a :class:`Completion`; raise :class:`MalformedResponse`.

    ``secret`` (the inference key) is redacted from any provider text that the
    error message quotes.
    """

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
