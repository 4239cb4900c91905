"""The simulator's HTTP plumbing: replies, a threaded server and the request handler.

:class:`SimulatorServer` serves a :class:`~jobs.simulator.Simulator` on a socket and can
close every open connection when the simulator stops; its handler routes
``POST /v1/chat/completions`` to :meth:`~jobs.simulator.Simulator.handle_chat` and
answers ``GET /stats`` and ``POST /reset`` for loopback clients only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.simulator import Simulator

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass
class Reply:
    """One HTTP answer: status, JSON body bytes and extra headers."""

    status: int
    body: bytes
    headers: dict[str, str]


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

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
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

    def handleerror_reply(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # the client went away or stop() closed the connection
        logger.exception("simulator handler failed")


def _shutdown_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "inference-simulator"
    sys_version = ""
    timeout = 300  # seconds an idle keep-alive connection stays open
    server: SimulatorServer

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
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True

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
        if path == CHAT_PATH:
            self._send(self.server.sim.handle_chat(self.headers.get("Authorization"), raw))
        elif path == "/reset" and _is_loopback(self.client_address[0]):
            self.server.sim.reset()
            self._send(json_reply(200, {"reset": True}))
        else:
            self._send(self._not_found())

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/stats" and _is_loopback(self.client_address[0]):
            self._send(json_reply(200, self.server.sim.stats().as_dict()))
        else:
            self._send(self._not_found())

    do_PUT = do_DELETE = do_PATCH = do_GET  # noqa: N815
