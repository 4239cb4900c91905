"""Unit tests for worker.client over httpx.MockTransport (no sockets).

Response parsing on its own is tested in test_responses.py.
"""

from __future__ import annotations

import json
import pickle
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from worker.client import ModelClient, default_timeout
from worker.errors import (
    AuthFailed,
    ConnectionFailed,
    MalformedResponse,
    ModelError,
    RateLimited,
    RequestRejected,
    ServerError,
    Timeout,
)
from worker.reported import RateLimitInfo, Usage
from worker.responses import Completion

KEY = "sk-SENTINEL-7f3a9c2e5b1d4068"
BASE_URL = "https://inference.example.test"
REQUEST = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "Hello!"}]}

Handler = Callable[[httpx.Request], httpx.Response]


def ok_body(**message: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": "Hi there"}
    msg.update(message)
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "kimi-k2-5",
        "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


@pytest.fixture
def make_client() -> Iterator[Callable[[Handler], ModelClient]]:
    clients: list[ModelClient] = []

    def factory(handler: Handler) -> ModelClient:
        client = ModelClient(
            BASE_URL,
            KEY,
            timeout=default_timeout(5.0, 30.0),
            transport=httpx.MockTransport(handler),
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def respond(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raising(exc_type: type[httpx.RequestError], text: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(text, request=request)

    return handler


def call_error(client: ModelClient) -> ModelError:
    with pytest.raises(ModelError) as info:
        client.chat(REQUEST)
    return info.value


# --- success ----------------------------------------------------------------


def test_client_request_id_is_sent_only_when_given(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok_body())

    client = make_client(handler)
    client.chat(REQUEST, client_request_id="bi-7-2")
    client.chat(REQUEST)
    assert seen[0].headers["x-client-request-id"] == "bi-7-2"
    assert "x-client-request-id" not in seen[1].headers


def test_success_sends_request_and_parses_completion(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json=ok_body(),
            headers={
                "x-request-id": "req-abc",
                "x-ratelimit-limit-requests": "150",
                "x-ratelimit-remaining-requests": "149",
                "x-ratelimit-reset-requests": "51s",
            },
        )

    result = make_client(handler).chat(REQUEST)

    assert len(seen) == 1
    sent = seen[0]
    assert sent.method == "POST"
    assert str(sent.url) == BASE_URL + "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["user-agent"] == "batch-infer/0.1"
    assert json.loads(sent.content) == REQUEST

    assert isinstance(result, Completion)
    assert result.output_text == "Hi there"
    assert result.reasoning_text is None
    assert result.tool_calls is None
    assert result.finish_reason == "stop"
    assert result.usage == Usage(prompt_tokens=11, completion_tokens=7, total_tokens=18)
    assert result.request_id == "req-abc"
    assert result.status == 200
    assert result.latency_s >= 0.0
    assert result.body == ok_body()
    assert result.rate_limits == RateLimitInfo(
        limit_requests=150, remaining_requests=149, reset_requests_s=51.0
    )


def test_trailing_slash_in_base_url(make_client: Callable[[Handler], ModelClient]) -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json=ok_body())

    client = ModelClient(
        BASE_URL + "/",
        KEY,
        timeout=default_timeout(1.0, 1.0),
        transport=httpx.MockTransport(handler),
    )
    with client:
        client.chat(REQUEST)
    assert paths == ["/v1/chat/completions"]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_is_read_from_either_field(
    make_client: Callable[[Handler], ModelClient], field: str
) -> None:
    body = ok_body(**{field: "First, think."})
    result = make_client(respond(200, body)).chat(REQUEST)
    assert result.reasoning_text == "First, think."
    assert result.output_text == "Hi there"


def test_unusual_reasoning_value_does_not_fail(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    result = make_client(respond(200, ok_body(reasoning={"weird": True}))).chat(REQUEST)
    assert result.reasoning_text is None
    assert result.output_text == "Hi there"


def test_tool_calls_with_null_content(make_client: Callable[[Handler], ModelClient]) -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Portland"}'},
        }
    ]
    body = ok_body(content=None, tool_calls=calls)
    body["choices"][0]["finish_reason"] = "tool_calls"
    result = make_client(respond(200, body)).chat(REQUEST)
    assert result.output_text is None
    assert result.tool_calls == calls
    assert result.finish_reason == "tool_calls"


def test_list_content_is_concatenated(make_client: Callable[[Handler], ModelClient]) -> None:
    content = [
        {"type": "text", "text": "Hello, "},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        {"type": "text", "text": "world"},
    ]
    result = make_client(respond(200, ok_body(content=content))).chat(REQUEST)
    assert result.output_text == "Hello, world"


# --- HTTP status classification ----------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls", "kind", "retryable"),
    [
        (400, RequestRejected, "rejected", False),
        (404, RequestRejected, "rejected", False),
        (413, RequestRejected, "rejected", False),
        (422, RequestRejected, "rejected", False),
        (302, RequestRejected, "rejected", False),
        (401, AuthFailed, "auth", False),
        (403, AuthFailed, "auth", False),
        (408, ServerError, "server_error", True),
        (409, ServerError, "server_error", True),
        (500, ServerError, "server_error", True),
        (502, ServerError, "server_error", True),
        (503, ServerError, "server_error", True),
        (504, ServerError, "server_error", True),
        (429, RateLimited, "rate_limited", True),
    ],
)
def test_status_maps_to_error(
    make_client: Callable[[Handler], ModelClient],
    status: int,
    cls: type[ModelError],
    kind: str,
    retryable: bool,
) -> None:
    body = {"error": {"message": "something went wrong", "type": "some_error"}}
    err = call_error(make_client(respond(status, body, {"x-request-id": "req-9"})))
    assert type(err) is cls
    assert err.kind == kind
    assert err.retryable is retryable
    assert err.status == status
    assert err.request_id == "req-9"
    assert "something went wrong" in str(err)
    assert str(status) in str(err)


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": 429, "message": "slow down", "type": "rate_limit_error"}},
        {"error": {"code": "rate_limit_exceeded", "message": "slow down"}},
        {"error": {"code": "internal_error", "message": "slow down"}},
        b"<html>Too Many Requests</html>",
        b"",
    ],
)
def test_429_is_classified_by_status_not_body(
    make_client: Callable[[Handler], ModelClient], body: Any
) -> None:
    err = call_error(make_client(respond(429, body)))
    assert isinstance(err, RateLimited)
    assert err.status == 429


def test_rate_limit_code_in_a_500_body_is_still_a_server_error(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    body = {"error": {"code": "rate_limit_exceeded", "message": "overloaded"}}
    err = call_error(make_client(respond(500, body)))
    assert type(err) is ServerError


def test_provider_message_is_truncated(make_client: Callable[[Handler], ModelClient]) -> None:
    body = {"error": {"message": "x" * 20_000}}
    err = call_error(make_client(respond(400, body)))
    assert 100 < len(str(err)) <= 600


def test_non_json_error_body_gives_short_snippet(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    html = b"<html>\n<body>Bad Gateway</body>\n</html>" + b" " * 10_000 + b"tail" * 5_000
    err = call_error(make_client(respond(502, html)))
    assert isinstance(err, ServerError)
    assert "Bad Gateway" in str(err)
    assert "\n" not in str(err)
    assert len(str(err)) <= 600


# --- Retry-After and x-ratelimit-reset-* --------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # Retry-After wins over everything else.
        (
            {
                "retry-after": "7",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "51s",
            },
            7.0,
        ),
        ({"retry-after": "1.5"}, 1.5),
        # Only the exhausted limit counts, even when its reset is the smaller one.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "3s",
                "x-ratelimit-remaining-tokens": "5000",
                "x-ratelimit-reset-tokens": "40s",
            },
            3.0,
        ),
        (
            {
                "x-ratelimit-remaining-requests": "10",
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "51s",
            },
            51.0,
        ),
        # Both exhausted: the larger reset.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1m30s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "51s",
            },
            90.0,
        ),
        # Nothing known to be exhausted: the larger of both.
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        # Unreadable Retry-After falls back to the reset headers.
        ({"retry-after": "soon", "x-ratelimit-reset-tokens": "250ms"}, 0.25),
        ({}, None),
    ],
)
def test_retry_after_precedence(
    make_client: Callable[[Handler], ModelClient],
    headers: dict[str, str],
    expected: float | None,
) -> None:
    body = {"error": {"code": 429, "message": "rate limited", "type": "rate_limit_error"}}
    err = call_error(make_client(respond(429, body, headers)))
    assert isinstance(err, RateLimited)
    if expected is None:
        assert err.retry_after is None
    else:
        assert err.retry_after == pytest.approx(expected)


def test_retry_after_http_date(make_client: Callable[[Handler], ModelClient]) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    err = call_error(make_client(respond(429, {}, {"retry-after": when})))
    assert isinstance(err, RateLimited)
    assert err.retry_after is not None
    # The date has one-second resolution and the test may run slowly: be generous.
    assert 60.0 < err.retry_after <= 121.0


def test_429_carries_rate_limit_info(make_client: Callable[[Handler], ModelClient]) -> None:
    headers = {
        "x-ratelimit-limit-tokens": "800000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "12s",
    }
    err = call_error(make_client(respond(429, {}, headers)))
    assert err.rate_limits == RateLimitInfo(
        limit_tokens=800_000, remaining_tokens=0, reset_tokens_s=12.0
    )
    assert "retry after 12s" in str(err)


# --- malformed 2xx ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json at all", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"id": "x"}', "choices"),
        (b'{"choices": []}', "choices"),
        (b'{"choices": [{"finish_reason": "stop"}]}', "message"),
        (b'{"choices": [{"message": "hello"}]}', "message"),
        (b'{"choices": [{"message": {"content": 42}}], "usage": null}', "content"),
    ],
)
def test_malformed_2xx(
    make_client: Callable[[Handler], ModelClient], body: bytes, fragment: str
) -> None:
    err = call_error(make_client(respond(200, body, {"x-request-id": "req-m"})))
    assert type(err) is MalformedResponse
    assert err.kind == "malformed"
    assert err.retryable is True
    assert err.status == 200
    assert err.request_id == "req-m"
    assert err.usage is None
    assert fragment in str(err)


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {"prompt_tokens": 3},
        {"prompt_tokens": "3", "completion_tokens": 4},
        {"prompt_tokens": -1, "completion_tokens": 4},
        {"prompt_tokens": True, "completion_tokens": 4},
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": "7"},
    ],
)
def test_missing_or_invalid_usage_is_malformed(
    make_client: Callable[[Handler], ModelClient], usage: Any
) -> None:
    body = ok_body()
    if usage is None:
        del body["usage"]
    else:
        body["usage"] = usage
    err = call_error(make_client(respond(200, body)))
    assert type(err) is MalformedResponse
    assert "usage" in str(err)


def test_malformed_keeps_usage_when_parsable(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    body = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    err = call_error(make_client(respond(200, body)))
    assert isinstance(err, MalformedResponse)
    assert err.usage == Usage(5, 2, 7)


def test_200_with_error_object_reports_provider_message(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    body = {"error": {"message": "upstream model crashed", "type": "server_error"}}
    err = call_error(make_client(respond(200, body)))
    assert isinstance(err, MalformedResponse)
    assert "upstream model crashed" in str(err)


# --- transport failures --------------------------------------------------------


@pytest.mark.parametrize(
    ("exc_type", "phase"),
    [
        (httpx.ConnectTimeout, "connect timeout after 5s"),
        (httpx.ReadTimeout, "read timeout after 30s"),
        (httpx.WriteTimeout, "write timeout after 5s"),
        (httpx.PoolTimeout, "pool timeout after 5s"),
    ],
)
def test_timeouts(
    make_client: Callable[[Handler], ModelClient],
    exc_type: type[httpx.TimeoutException],
    phase: str,
) -> None:
    err = call_error(make_client(raising(exc_type, "timed out")))
    assert type(err) is Timeout
    assert err.kind == "timeout"
    assert err.retryable is True
    assert err.status is None
    assert phase in str(err)


@pytest.mark.parametrize(
    "exc_type",
    [httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError],
)
def test_connection_errors(
    make_client: Callable[[Handler], ModelClient], exc_type: type[httpx.RequestError]
) -> None:
    err = call_error(make_client(raising(exc_type, "[Errno 111] Connection refused")))
    assert type(err) is ConnectionFailed
    assert err.kind == "connection"
    assert err.retryable is True
    assert err.status is None
    assert exc_type.__name__ in str(err)


def test_unserializable_body_is_rejected_without_a_request(
    make_client: Callable[[Handler], ModelClient],
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json=ok_body())

    client = make_client(handler)
    with pytest.raises(RequestRejected):
        client.chat({"model": "kimi-k2-5", "messages": {1, 2}})
    with pytest.raises(RequestRejected):
        client.chat({"model": "kimi-k2-5", "temperature": float("nan")})
    assert calls == []


# --- the key never leaks ------------------------------------------------------


def echo_key(status: int) -> Handler:
    """A hostile endpoint that quotes the caller's Authorization header everywhere."""

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        body = {"error": {"message": f"bad key {auth}", "type": auth, "code": auth}}
        return httpx.Response(status, json=body, headers={"x-echo": auth})

    return handler


def echo_key_in_200(kind: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        if kind == "not_json":
            return httpx.Response(200, content=f"<p>{auth}</p>".encode())
        return httpx.Response(200, json={"error": {"message": auth}})

    return handler


def raise_with_key(exc_type: type[httpx.RequestError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(f"failed sending {request.headers['authorization']}", request=request)

    return handler


LEAKY_HANDLERS: list[Handler] = [
    *(echo_key(s) for s in (400, 401, 403, 404, 408, 409, 429, 500, 503, 302)),
    echo_key_in_200("not_json"),
    echo_key_in_200("error"),
    *(
        raise_with_key(e)
        for e in (
            httpx.ConnectTimeout,
            httpx.ReadTimeout,
            httpx.WriteTimeout,
            httpx.PoolTimeout,
            httpx.ConnectError,
            httpx.ReadError,
            httpx.RemoteProtocolError,
            httpx.DecodingError,
        )
    ),
]


def test_key_never_appears_in_any_error(make_client: Callable[[Handler], ModelClient]) -> None:
    kinds_seen: set[str] = set()
    for handler in LEAKY_HANDLERS:
        err = call_error(make_client(handler))
        kinds_seen.add(err.kind)
        rendered = [
            str(err),
            repr(err),
            "".join(traceback.format_exception(err)),
            repr(err.__dict__),
            repr(err.args),
        ]
        for text in rendered:
            assert KEY not in text
        assert KEY.encode() not in pickle.dumps(err)
        # httpx exceptions hold the request with its headers: none may be attached.
        assert err.__cause__ is None
        assert err.__context__ is None
    assert kinds_seen == {
        "rejected",
        "auth",
        "server_error",
        "rate_limited",
        "malformed",
        "timeout",
        "connection",
    }
    client = make_client(respond(200, ok_body()))
    assert KEY not in repr(client)


# --- odds and ends ---------------------------------------------------------------


def test_errors_pickle_with_their_attributes() -> None:
    limits = RateLimitInfo(remaining_tokens=0, reset_tokens_s=3.0)
    err = RateLimited("HTTP 429", request_id="r1", rate_limits=limits, retry_after=3.0)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimited
    assert str(copy) == "HTTP 429"
    assert (copy.status, copy.request_id, copy.rate_limits, copy.retry_after) == (
        429,
        "r1",
        limits,
        3.0,
    )
    bad = pickle.loads(pickle.dumps(MalformedResponse("m", status=200, usage=Usage(1, 2, 3))))
    assert bad.usage == Usage(1, 2, 3)
    assert bad.status == 200


def test_default_timeout_is_explicit() -> None:
    timeout = default_timeout(10.0, 300.0)
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (10.0, 300.0, 10.0, 10.0)
    with pytest.raises(ValueError):
        default_timeout(0.0, 1.0)


def test_invalid_base_url() -> None:
    for url in ("ftp://example.test", "example.test", ""):
        with pytest.raises(ValueError) as info:
            ModelClient(url, KEY, timeout=default_timeout(1.0, 1.0))
        assert KEY not in str(info.value)


def test_context_manager_closes_the_pool() -> None:
    client = ModelClient(
        BASE_URL,
        KEY,
        timeout=default_timeout(1.0, 1.0),
        transport=httpx.MockTransport(respond(200, ok_body())),
    )
    with client as entered:
        assert entered is client
        assert client.chat(REQUEST).output_text == "Hi there"
    with pytest.raises(RuntimeError):
        client.chat(REQUEST)


def test_client_serves_repeated_calls(make_client: Callable[[Handler], ModelClient]) -> None:
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        return httpx.Response(200, json=ok_body())

    client = make_client(handler)
    results = [client.chat(REQUEST) for _ in range(5)]
    assert count == 5
    assert all(r.usage.total_tokens == 18 for r in results)
