"""The simulator's HTTP plumbing: replies, a threaded server and the request handler.

:class:`SimulatorServer` serves a :class:`~devstack.simulator.Simulator` on a socket and can
close every open connection when the simulator stops; its handler routes
``POST /v1/chat/completions`` to :meth:`~devstack.simulator.Simulator.handle_chat` and
answers ``GET /stats``, ``GET /calls``, ``POST /reset``, ``POST /faults`` and
``POST /outage`` for loopback clients only (see :mod:`devstack.simulator` for what they do).

Every answer leaves in a single write on a ``TCP_NODELAY`` socket: a header write and a
body write on a Nagle socket would wait for the client's delayed ACK (about 40 ms) on
every keep-alive call.

A chat answer is written only if its client is still connected when it is ready (after
the simulated latency): a client killed mid-call has closed its end by then, and the
call log must tell that call apart from one whose answer was read (see
:attr:`~devstack.simulator.calls.SimCall.delivered`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import select
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from devstack.simulator.calls import SimCall, SimulatorStats

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 32 * 1024 * 1024


class _AsDict(Protocol):
    def as_dict(self) -> dict[str, float]: ...


class Simulated(Protocol):
    """What the server needs of a simulator (:class:`~devstack.simulator.core.Simulator`)."""

    @property
    def stopping(self) -> bool: ...

    def handle_chat(
        self, authorization: str | None, raw: bytes | None, client_request_id: str | None = None
    ) -> Reply: ...

    def stats(self) -> SimulatorStats: ...

    def snapshot(self, *, with_calls: bool = True) -> tuple[SimulatorStats, list[SimCall]]: ...

    def reset(self) -> None: ...

    def set_faults(
        self,
        *,
        error_rate: float | None = None,
        hang_rate: float | None = None,
        malformed_rate: float | None = None,
        hang_seconds: float | None = None,
    ) -> _AsDict: ...

    def outage(self, seconds: float, status: int = 503) -> None: ...


@dataclass
class Reply:
    """One HTTP answer: status, JSON body bytes and extra headers."""

    status: int
    body: bytes
    headers: dict[str, str]
    #: Called once the answer is ready, with whether it was written to a client still
    #: connected; a reply with one is not written at all to a client already gone.
    settle: Callable[[bool], None] | None = None


def json_reply(status: int, payload: object, headers: dict[str, str] | None = None) -> Reply:
    """A reply whose body is ``payload`` as JSON."""
    return Reply(status, json.dumps(payload).encode(), dict(headers or {}))


def error_reply(status: int, message: str, type_: str, code: str | None) -> Reply:
    """An OpenAI-style ``{"error": {...}}`` reply."""
    return json_reply(status, {"error": {"message": message, "type": type_, "code": code}})


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class SimulatorServer(ThreadingHTTPServer):
    """Threaded HTTP server that tracks open connections so ``stop`` can close them."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sim: Simulated) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_changed = threading.Condition()
        self._closing = False
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup that can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        assert isinstance(request, socket.socket)
        with self._conns_changed:
            self._conns.add(request)
            closing = self._closing
        if closing:
            _shutdown_socket(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_changed:
                self._conns.discard(request)
                self._conns_changed.notify_all()

    def close_connections(self, timeout: float) -> None:
        """Shut down every open connection and wait (bounded) for their handlers to finish."""
        with self._conns_changed:
            self._closing = True
            for conn in list(self._conns):
                _shutdown_socket(conn)
            self._conns_changed.wait_for(lambda: not self._conns, timeout=timeout)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # the client went away or stop() closed the connection
        logger.exception("simulator handler failed")


def _shutdown_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def peer_gone(conn: socket.socket) -> bool:
    """Whether the client has closed or reset its end of ``conn``; never blocks or reads.

    Readable with nothing to peek is end of file; readable with bytes is a keep-alive
    client that already sent its next request, still there to read this answer. (poll,
    not select: a busy simulator has descriptors beyond select's 1024.)
    """
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    try:
        if not poller.poll(0):
            return False
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset by the peer, or shut down by stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "inference-simulator"
    sys_version = ""
    timeout = 300  # seconds an idle keep-alive connection stays open
    # Buffered, so that the status line, the headers and the body go out in one write.
    wbufsize = 64 * 1024
    server: SimulatorServer

    def setup(self) -> None:
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines would only clutter test and benchmark output

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            # Every client we serve sends Content-Length; chunked uploads are refused.
            raise ValueError("Transfer-Encoding is not supported; send Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _send(self, reply: Reply) -> None:
        if self.server.sim.stopping:
            reply.headers["Connection"] = "close"
        if reply.headers.get("Connection") == "close":
            self.close_connection = True
        delivered = False
        try:
            if reply.settle is not None and peer_gone(self.connection):
                self.close_connection = True
            else:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)
                self.wfile.flush()
                delivered = True
        except OSError:
            self.close_connection = True
        finally:
            if reply.settle is not None:
                reply.settle(delivered)

    def _not_found(self) -> Reply:
        return error_reply(
            404,
            f"Unknown endpoint {self.command} {self.path.split('?')[0][:200]}.",
            "invalid_request_error",
            None,
        )

    def do_POST(self) -> None:
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(
                error_reply(400, "Malformed request framing.", "invalid_request_error", None)
            )
            return
        path = self.path.split("?", 1)[0]
        sim = self.server.sim
        if path == CHAT_PATH:
            self._send(
                sim.handle_chat(
                    self.headers.get("Authorization"), raw, self.headers.get("X-Client-Request-Id")
                )
            )
        elif not _is_loopback(self.client_address[0]):
            self._send(self._not_found())
        elif path == "/reset":
            sim.reset()
            self._send(json_reply(200, {"reset": True}))
        elif path in ("/faults", "/outage"):
            self._send(_control(sim, path, raw))
        else:
            self._send(self._not_found())

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/stats", "/calls") or not _is_loopback(self.client_address[0]):
            self._send(self._not_found())
        elif path == "/stats":
            self._send(json_reply(200, self.server.sim.stats().as_dict()))
        else:
            stats, calls = self.server.sim.snapshot()
            payload = {"stats": stats.as_dict(), "calls": [call.as_dict() for call in calls]}
            self._send(json_reply(200, payload))

    do_PUT = do_DELETE = do_PATCH = do_GET  # noqa: N815


_FAULT_FIELDS = ("error_rate", "hang_rate", "malformed_rate", "hang_seconds")


def _control(sim: Simulated, path: str, raw: bytes | None) -> Reply:
    """Apply ``POST /faults`` or ``POST /outage``; a bad body gets a 400 naming the field."""
    try:
        try:
            payload = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            raise ValueError("the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise ValueError("the body must be a JSON object")
        if path == "/faults":
            fields = _numbers(payload, _FAULT_FIELDS)
            faults = sim.set_faults(**fields)
            return json_reply(200, {"faults": faults.as_dict()})
        fields = _numbers(payload, ("seconds", "status"))
        if "seconds" not in fields:
            raise ValueError("seconds: required")
        status = fields.get("status", 503.0)
        if not status.is_integer():
            raise ValueError("status: must be an integer")
        sim.outage(fields["seconds"], int(status))
        return json_reply(200, {"outage": {"seconds": fields["seconds"], "status": int(status)}})
    except (ValueError, OverflowError) as exc:
        return error_reply(400, str(exc), "invalid_request_error", None)


def _numbers(payload: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in payload.items():
        if name not in allowed:
            raise ValueError(f"{name}: unknown field (expected {', '.join(allowed)})")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{name}: must be a number")
        out[name] = float(value)
    return out
