"""HTTP client for an OpenAI-compatible ``/v1/chat/completions`` endpoint.

One :class:`ModelClient` sends every call of one endpoint and turns every
outcome into either a :class:`~worker.responses.Completion` or one exception
from the :mod:`worker.errors` tree.

Each thread that calls gets an ``httpx.Client`` of its own, holding its one
keep-alive connection, and all of them share one TLS context. A thread makes one
call at a time, so it never waits for a connection; and a pool shared by a hundred
threads costs every request a walk over all its connections (httpcore checks each
idle one for a server-side close) under the pool's lock.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import httpx

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
from worker.reported import RateLimitInfo
from worker.responses import (
    NOT_JSON,
    Completion,
    clean_text,
    load_json,
    parse_completion,
    parse_rate_limit_headers,
    provider_body,
    provider_text,
    request_id_of,
    retry_after_seconds,
)

USER_AGENT = "batch-infer/0.1"
CHAT_PATH = "/v1/chat/completions"
#: Header carrying our id of a call (``bi-<job>-<attempt>``, the ledger row's key).
CLIENT_REQUEST_ID = "X-Client-Request-Id"
#: Idle keep-alive connections are dropped after this many seconds.
KEEPALIVE_EXPIRY_S = 30.0
#: httpcore trace events (``trace`` request extension) fired once the whole request,
#: body included, has been written to the socket: from then on the provider has it.
_SENT_EVENTS = frozenset({"http11.send_request_body.complete", "http2.send_request_body.complete"})


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
    """Sends chat-completion requests, each thread over its own ``httpx.Client``.

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
    ) -> None:
        url = httpx.URL(base_url.rstrip("/") + CHAT_PATH)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("base_url must be an absolute http:// or https:// URL")
        self._url = url
        self._secret = key
        self._timeout = timeout
        self._transport = transport
        # Loading the CA bundle is the costly part of a client: done once, here.
        self._tls = httpx.create_ssl_context()
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self._closed = False

    def _http(self) -> httpx.Client:
        """This thread's client, made at its first call."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is not None:
            return client
        client = httpx.Client(
            headers={
                "Authorization": f"Bearer {self._secret}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_EXPIRY_S
            ),
            verify=self._tls,
            transport=self._transport,
            follow_redirects=False,
        )
        with self._clients_lock:
            if self._closed:
                client.close()
                raise RuntimeError("ModelClient is closed")
            self._clients.append(client)
        self._local.client = client
        return client

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
        """Close every thread's connection; the client is unusable afterwards."""
        with self._clients_lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def chat(
        self,
        body: Mapping[str, Any],
        *,
        client_request_id: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Completion:
        """POST ``body`` to ``/v1/chat/completions``; raise a :class:`ModelError` subclass.

        ``client_request_id`` goes out as ``X-Client-Request-Id`` (OpenAI's name
        for a caller-chosen id), so the provider's logs and our ledger row of the
        call can be matched even when the answer never arrives.

        ``on_sent`` is called in this thread as soon as the whole request has been
        written to the socket, before the answer is awaited (through httpcore's
        ``trace`` extension; a transport that does not trace, such as
        ``httpx.MockTransport``, never calls it). It must not raise.

        Errors are raised outside any ``except`` block so that no httpx
        exception (which holds the request and its headers) is attached as
        ``__cause__`` or ``__context__``.
        """
        payload = _encode(body)
        if isinstance(payload, ModelError):
            raise payload
        started = time.monotonic()
        outcome = self._send(payload, client_request_id, on_sent)
        if isinstance(outcome, ModelError):
            raise outcome
        latency = time.monotonic() - started
        return self._interpret(outcome, latency)

    def _send(
        self,
        payload: bytes,
        client_request_id: str | None,
        on_sent: Callable[[], None] | None,
    ) -> httpx.Response | ModelError:
        headers = {CLIENT_REQUEST_ID: client_request_id} if client_request_id else None
        extensions = None
        if on_sent is not None:

            def trace(event: str, info: Mapping[str, Any]) -> None:
                if event in _SENT_EVENTS:
                    on_sent()

            extensions = {"trace": trace}
        try:
            return self._http().post(
                self._url, content=payload, headers=headers, extensions=extensions
            )
        except httpx.TimeoutException as exc:
            return self._timeout_error(exc)
        except httpx.DecodingError as exc:
            return MalformedResponse(f"response body could not be decoded ({type(exc).__name__})")
        except httpx.RequestError as exc:
            detail = clean_text(str(exc), self._secret, limit=200)
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
        request_id = request_id_of(headers)
        limits = parse_rate_limit_headers(headers)
        if 200 <= status < 300:
            body = load_json(response.content)
            if body is NOT_JSON:
                snippet = clean_text(
                    response.content[:200].decode("utf-8", "replace"), self._secret
                )
                raise MalformedResponse(
                    f"HTTP {status} with unusable body: not JSON ({snippet or 'empty'})",
                    status=status,
                    request_id=request_id,
                    rate_limits=limits,
                )
            return parse_completion(
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
        text = provider_text(response.content, self._secret)
        where = f" [request id {request_id}]" if request_id else ""
        if status == 429:
            wait = retry_after_seconds(response.headers, limits)
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
            f"{prefix}: {text}{where}",
            status=status,
            request_id=request_id,
            rate_limits=limits,
            body=provider_body(response.content, self._secret),
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
        return RequestRejected(f"request body is not valid JSON: {clean_text(str(exc), None, 200)}")
    return text.encode("utf-8")
