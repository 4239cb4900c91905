"""Unit tests for worker.responses: completion bodies and rate-limit headers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from worker.errors import MalformedResponse
from worker.reported import RateLimitInfo, Usage
from worker.responses import (
    parse_completion,
    parse_duration,
    parse_rate_limit_headers,
)


def ok_body() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "kimi-k2-5",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


# --- completion bodies --------------------------------------------------------


def test_missing_total_tokens_is_summed() -> None:
    body = ok_body()
    body["usage"] = {"prompt_tokens": 3, "completion_tokens": 4}
    result = parse_completion(body, status=200, request_id=None, latency_s=0.5, rate_limits=None)
    assert result.usage == Usage(3, 4, 7)
    assert result.latency_s == 0.5


def test_parse_completion_rejects_non_dict() -> None:
    with pytest.raises(MalformedResponse):
        parse_completion(None, status=200, request_id=None, latency_s=0.0, rate_limits=None)


def test_parse_completion_redacts_the_secret_from_provider_text() -> None:
    body = {"error": {"message": "bad key sk-test-123", "type": "auth_error"}}
    with pytest.raises(MalformedResponse) as info:
        parse_completion(
            body,
            status=200,
            request_id=None,
            latency_s=0.0,
            rate_limits=None,
            secret="sk-test-123",
        )
    assert "sk-test-123" not in str(info.value)
    assert "[redacted]" in str(info.value)


# --- header parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("51s", 51.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("12", 12.0),
        ("12.5", 12.5),
        (" 7s ", 7.0),
        ("0", 0.0),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("-5s", None),
        ("5 s", None),
        ("s", None),
        ("5x", None),
        ("nan", None),
        ("inf", None),
        ("1m30", None),
    ],
)
def test_parse_duration(text: str, expected: float | None) -> None:
    result = parse_duration(text)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_parse_rate_limit_headers() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "150",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "51s",
            "x-ratelimit-limit-tokens": "800000",
            "x-ratelimit-remaining-tokens": "123456",
            "x-ratelimit-reset-tokens": "250ms",
        }
    )
    assert parse_rate_limit_headers(headers) == RateLimitInfo(150, 0, 800_000, 123_456, 51.0, 0.25)


def test_parse_rate_limit_headers_absent_or_junk() -> None:
    assert parse_rate_limit_headers(httpx.Headers({"content-type": "application/json"})) is None
    assert parse_rate_limit_headers(httpx.Headers({"x-ratelimit-limit-requests": "lots"})) is None
    partial = parse_rate_limit_headers(
        httpx.Headers({"x-ratelimit-remaining-tokens": "9", "x-ratelimit-reset-tokens": "?"})
    )
    assert partial == RateLimitInfo(remaining_tokens=9)
