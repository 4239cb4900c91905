"""OpenAI-compatible chat-completions simulator on loopback, for the demo, tests and benchmarks.

It answers ``POST /v1/chat/completions`` like Heroku Managed Inference would: bearer-key
auth, request validation, deterministic usage and replies (including tool calls and
reasoning text), a strict sliding-window rate limit on requests and tokens with the
``x-ratelimit-*`` headers, and injectable faults (5xx, hangs, malformed bodies, a forced run
of one status). It counts what the provider would have charged so a benchmark can check the
client never exceeded the limits and never paid twice for the same body, and it keeps a
:class:`~devstack.simulator.calls.SimCall` record of every call (:meth:`Simulator.calls`) so a
fault-injection test can check those invariants call for call, including whether each
answer reached a client still connected or the client was gone by then (a worker killed
mid-call; such an answer is not written). Faults can be changed while it runs
(:meth:`Simulator.set_faults`, :meth:`Simulator.outage`); clients keep their connections.

Besides the chat endpoint it answers, for loopback clients only:

* ``GET /stats``: :class:`SimulatorStats` as JSON;
* ``GET /calls``: ``{"stats": {...}, "calls": [{...}, ...]}``, the stats and the kept call
  records (oldest first, see :class:`~devstack.simulator.calls.SimCall`) taken at the same instant;
* ``POST /reset``: clears the stats, the call records and the rate window;
* ``POST /faults``: a JSON object with any of ``error_rate``, ``hang_rate``,
  ``malformed_rate`` and ``hang_seconds`` (:meth:`Simulator.set_faults`); answers the fault
  settings now in force;
* ``POST /outage``: ``{"seconds": s, "status": 503}`` (:meth:`Simulator.outage`).

Run standalone with ``python -m devstack.simulator --help`` (:mod:`devstack.simulator.__main__`).
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import itertools
import json
import math
import random
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from devstack.simulator.calls import (
    MARKER_CHARS,
    CallIds,
    CallLog,
    Outcome,
    SimCall,
    SimulatorStats,
)
from devstack.simulator.limits import (
    ChatRequest,
    InvalidRequestError,
    SlidingWindow,
    WindowState,
    completion_body,
    max_in_window,
    parse_request,
    plan_reply,
)
from devstack.simulator.server import (
    MAX_BODY_BYTES,
    Reply,
    SimulatorServer,
    error_reply,
    json_reply,
)

__all__ = ["Faults", "SimCall", "Simulator", "SimulatorConfig", "SimulatorStats"]


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated provider behaves (frozen: use ``dataclasses.replace`` to vary it)."""

    #: The bearer key accepted (rotate at runtime with :meth:`Simulator.set_key`).
    key: str = "sim-key"
    models: frozenset[str] = frozenset({"kimi-k2-5"})
    #: Requests / tokens admitted per ``window_s`` sliding window; ``None`` = unlimited.
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    #: ``reserve``: a call costs prompt + (max_tokens or default_max_tokens) at admission;
    #: ``actual``: prompt + the completion tokens it will get.
    charge: Literal["reserve", "actual"] = "reserve"
    chars_per_token: float = 4.0
    default_max_tokens: int = 4096
    context_tokens: int = 262_144
    #: Seconds slept after admission, drawn uniformly per call.
    latency_min: float = 0.0
    latency_max: float = 0.0
    #: Per-call fault probabilities, drawn once per valid call (error, then hang, then
    #: malformed): 500/503 alternately; sleeping ``hang_seconds`` then 504; a 200 whose
    #: body is truncated JSON. Faulted calls are not admitted and charge nothing. These are
    #: the starting values: :meth:`Simulator.set_faults` changes them at runtime.
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 3600.0
    malformed_rate: float = 0.0
    #: Add ``Retry-After`` to 429s (Heroku documents none).
    retry_after: bool = False
    #: Send the ``x-ratelimit-*`` headers; without them only 429s tell a client that
    #: someone else uses the key.
    ratelimit_headers: bool = True
    rate_limit_code: str = "rate_limit_exceeded"
    seed: int = 0
    #: Call records kept for :meth:`Simulator.calls`; the oldest go first beyond this (a
    #: record takes about 0.4 KB, so the default costs up to about 80 MB). 0 keeps none.
    call_log_limit: int = 200_000

    def __post_init__(self) -> None:
        problems = [
            msg
            for bad, msg in (
                (not self.key, "key must not be empty"),
                (not self.models, "models must not be empty"),
                (self.rpm is not None and self.rpm < 1, "rpm must be >= 1 or None"),
                (self.tpm is not None and self.tpm < 1, "tpm must be >= 1 or None"),
                (self.window_s <= 0, "window_s must be > 0"),
                (self.charge not in ("reserve", "actual"), "charge must be 'reserve' or 'actual'"),
                (self.chars_per_token <= 0, "chars_per_token must be > 0"),
                (self.default_max_tokens < 1, "default_max_tokens must be >= 1"),
                (self.context_tokens < 1, "context_tokens must be >= 1"),
                (
                    not 0 <= self.latency_min <= self.latency_max,
                    "need 0 <= latency_min <= latency_max",
                ),
                (self.hang_seconds < 0, "hang_seconds must be >= 0"),
                (self.call_log_limit < 0, "call_log_limit must be >= 0"),
            )
            if bad
        ]
        for name in ("error_rate", "hang_rate", "malformed_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be between 0 and 1")
        if problems:
            raise ValueError("invalid SimulatorConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Faults:
    """The fault settings in force (as in :class:`SimulatorConfig`); see ``set_faults``."""

    error_rate: float
    hang_rate: float
    malformed_rate: float
    hang_seconds: float

    def __post_init__(self) -> None:
        for name in ("error_rate", "hang_rate", "malformed_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if not 0.0 <= self.hang_seconds < math.inf:
            raise ValueError("hang_seconds must be a finite number >= 0")

    def as_dict(self) -> dict[str, float]:
        """The settings as a plain JSON-ready dict."""
        return dataclasses.asdict(self)


class Simulator:
    """A running (or startable) simulated provider; use as a context manager or start/stop."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SimulatorConfig()
        self._host = host
        self._port = port
        self._key = self.config.key
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        self._window = SlidingWindow(self.config.rpm, self.config.tpm, self.config.window_s)
        self._log = CallLog(self.config.call_log_limit)
        self._numbers = itertools.count(1)
        self._error_flip = 0
        self._forced: tuple[int, float] | None = None
        self._outage: tuple[int, float] | None = None
        cfg = self.config
        self._faults = Faults(cfg.error_rate, cfg.hang_rate, cfg.malformed_rate, cfg.hang_seconds)
        self._stopping = threading.Event()
        self._server: SimulatorServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL; clients POST to ``url + "/v1/chat/completions"``."""
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        host = self._server.server_name
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._server.server_port}"

    def start(self) -> Simulator:
        """Bind the socket and serve from a daemon thread."""
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("a Simulator can be started once; create a new one")
        self._server = SimulatorServer((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake hanging handlers, close the listening socket and open connections."""
        server = self._server
        if server is None or self._stopping.is_set():
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections(timeout=3.0)
        if self._thread is not None:
            self._thread.join(timeout=3.0)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has been called."""
        return self._stopping.is_set()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def force_status(self, status: int, seconds: float) -> None:
        """Answer every chat call with ``status`` for the next ``seconds`` (0 cancels)."""
        if not 400 <= status <= 599:
            raise ValueError("force_status needs an HTTP error status (400-599)")
        with self._lock:
            self._forced = (status, time.monotonic() + seconds) if seconds > 0 else None

    def set_key(self, key: str) -> None:
        """Accept ``key`` from now on (and no longer the previous one)."""
        if not key:
            raise ValueError("the simulator key must not be empty")
        with self._lock:
            self._key = key

    def set_faults(
        self,
        *,
        error_rate: float | None = None,
        hang_rate: float | None = None,
        malformed_rate: float | None = None,
        hang_seconds: float | None = None,
    ) -> Faults:
        """Change the given fault settings from the next call on; returns those now in force.

        Calls already hanging keep their ``hang_seconds``. :meth:`reset` leaves faults alone.
        """
        changes = {
            name: float(value)
            for name, value in (
                ("error_rate", error_rate),
                ("hang_rate", hang_rate),
                ("malformed_rate", malformed_rate),
                ("hang_seconds", hang_seconds),
            )
            if value is not None
        }
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **changes)
            return self._faults

    def faults(self) -> Faults:
        """The fault settings in force."""
        with self._lock:
            return self._faults

    def outage(self, seconds: float, status: int = 503) -> None:
        """Answer ``status`` to every valid authenticated call for the next ``seconds``.

        Such calls are not admitted and charge nothing; they are counted and logged like a
        :meth:`force_status` answer. Unlike :meth:`force_status`, bad keys and bad bodies
        still get their 401/4xx. ``seconds=0`` ends an outage early.
        """
        if not 400 <= status <= 599:
            raise ValueError("outage needs an HTTP error status (400-599)")
        if not 0 <= seconds < math.inf:
            raise ValueError("outage seconds must be a finite number >= 0")
        with self._lock:
            self._outage = (status, time.monotonic() + seconds) if seconds > 0 else None

    def stats(self) -> SimulatorStats:
        """A snapshot of the counters plus the exact most-admitted-in-any-window figures."""
        return self.snapshot(with_calls=False)[0]

    def calls(self) -> list[SimCall]:
        """A copy of the kept call records, oldest first (see ``call_log_limit``)."""
        with self._lock:
            return self._log.records()

    def snapshot(self, *, with_calls: bool = True) -> tuple[SimulatorStats, list[SimCall]]:
        """The stats and the call records taken at the same instant, so they agree."""
        with self._lock:
            values = self._log.counters()
            admissions = self._window.admissions()
            records = self._log.records() if with_calls else []
        # The window scan is O(admissions): done outside the lock so calls are not held up.
        values["max_requests_in_window"], values["max_tokens_in_window"] = max_in_window(
            admissions, self.config.window_s
        )
        return SimulatorStats(**values), records

    def reset(self) -> None:
        """Clear the counters, the call records, the duplicate tracking and the rate window.

        Calls still in progress are left out of the new books when their answers are ready.
        """
        with self._lock:
            self._log = CallLog(self.config.call_log_limit)
            self._window.reset()

    # -- request handling (runs on handler threads) --------------------------------------

    def _record(
        self,
        ids: CallIds,
        status: int,
        outcome: Outcome,
        req: ChatRequest | None = None,
        marker: str | None = None,
    ) -> None:
        """Count and log a call that was answered without being admitted."""
        call = SimCall(
            request_id=ids.request_id,
            client_request_id=ids.client_request_id,
            status=status,
            outcome=outcome,
            admitted=False,
            charged=0,
            prompt_tokens=0,
            completion_tokens=0,
            body_hash=req.digest.hex() if req is not None else None,
            marker=marker,
            arrived_at=ids.arrived_at,
            admitted_at=None,
        )
        with self._lock:
            self._log.add(call)

    def _in_force(self, outage: bool) -> tuple[int, float] | None:
        """The forced (or outage) status still in force, with its seconds left."""
        with self._lock:
            setting = self._outage if outage else self._forced
        if setting is None:
            return None
        status, until = setting
        left = until - time.monotonic()
        return (status, left) if left > 0 else None

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").strip().partition(" ")
        with self._lock:
            key = self._key
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), key.encode()
        )

    def _draw_fault(self) -> tuple[str | None, float]:
        with self._lock:
            roll = self._rng.random()
            faults = self._faults
        fault = None
        if roll < faults.error_rate:
            fault = "error"
        elif roll < faults.error_rate + faults.hang_rate:
            fault = "hang"
        elif roll < faults.error_rate + faults.hang_rate + faults.malformed_rate:
            fault = "malformed"
        return fault, faults.hang_seconds

    def _limited_reply(self, state: WindowState, wait: float, message: str) -> Reply:
        reply = json_reply(
            429,
            {
                "error": {
                    "code": self.config.rate_limit_code,
                    "message": message,
                    "type": "rate_limit_error",
                }
            },
            self._rate_headers(state),
        )
        if self.config.retry_after:
            reply.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return reply

    def _forced_reply(self, status: int, left: float, why: str) -> tuple[Reply, Outcome]:
        if status == 429:
            state = dataclasses.replace(
                self._window.peek(0),
                remaining_requests=0,
                remaining_tokens=0,
                reset_requests=left,
                reset_tokens=left,
            )
            return self._limited_reply(state, left, f"Rate limit reached ({why})."), "rate_limited"
        if status >= 500:
            reply = error_reply(
                status,
                f"The server is unavailable ({why}).",
                "server_error",
                "service_unavailable",
            )
            return reply, "server_error"
        reply = error_reply(status, f"Request refused ({why}).", "invalid_request_error", None)
        return reply, "client_error"

    def _fault_reply(
        self,
        fault: str,
        hang_seconds: float,
        number: int,
        ids: CallIds,
        req: ChatRequest,
        marker: str | None,
    ) -> Reply:
        if fault == "error":
            with self._lock:
                self._error_flip += 1
                status = 500 if self._error_flip % 2 else 503
            self._record(ids, status, "server_error", req, marker)
            message = "The server had an error while processing your request (simulated)."
            return error_reply(
                status,
                message,
                "server_error",
                "internal_error" if status == 500 else "service_unavailable",
            )
        if fault == "hang":
            # Logged before the hang so that a test can see the call is in progress.
            self._record(ids, 504, "hang", req, marker)
            self._stopping.wait(hang_seconds)
            reply = error_reply(
                504, "The upstream model timed out (simulated).", "server_error", "timeout"
            )
            reply.headers["Connection"] = "close"
            return reply
        self._record(ids, 200, "malformed", req, marker)
        return Reply(200, f'{{"id": "chatcmpl-sim-{number}", "choices": ['.encode(), {})

    def handle_chat(
        self, authorization: str | None, raw: bytes | None, client_request_id: str | None = None
    ) -> Reply:
        """Answer one chat-completions call; ``raw`` is ``None`` when the body was too large.

        ``client_request_id`` is the caller's ``X-Client-Request-Id``, kept in the call log.
        The server calls the reply's ``settle`` with whether the answer reached a client still
        connected; until then the call's record has ``delivered=None``.
        """
        arrived_at = time.monotonic()
        number = next(self._numbers)
        ids = CallIds(f"req-sim-{number}", client_request_id, arrived_at)
        reply = self._chat(authorization, raw, number, ids)
        reply.headers["x-request-id"] = ids.request_id
        reply.settle = functools.partial(self._settle, ids.request_id)
        return reply

    def _settle(self, request_id: str, delivered: bool) -> None:
        at = time.monotonic()
        with self._lock:
            self._log.settle(request_id, delivered, at)

    def _chat(
        self, authorization: str | None, raw: bytes | None, number: int, ids: CallIds
    ) -> Reply:
        cfg = self.config
        forced = self._in_force(outage=False)
        if forced is not None:
            reply, outcome = self._forced_reply(*forced, "forced by the simulator")
            self._record(ids, reply.status, outcome)
            return reply
        if not self._authorized(authorization):
            self._record(ids, 401, "client_error")
            return error_reply(
                401, "Incorrect API key provided.", "authentication_error", "invalid_api_key"
            )
        try:
            if raw is None:
                raise InvalidRequestError(
                    f"Request body exceeds {MAX_BODY_BYTES} bytes.", None, status=413
                )
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise InvalidRequestError(
                    "We could not parse the JSON body of your request.", None
                ) from None
            req = parse_request(
                body,
                models=cfg.models,
                chars_per_token=cfg.chars_per_token,
                context_tokens=cfg.context_tokens,
            )
        except InvalidRequestError as exc:
            self._record(ids, exc.status, "client_error")
            return json_reply(exc.status, exc.body())
        user = body.get("user")
        marker = user[:MARKER_CHARS] if isinstance(user, str) else None
        outage = self._in_force(outage=True)
        if outage is not None:
            reply, outcome = self._forced_reply(*outage, "simulated outage")
            self._record(ids, reply.status, outcome, req, marker)
            return reply
        fault, hang_seconds = self._draw_fault()
        if fault is not None:
            return self._fault_reply(fault, hang_seconds, number, ids, req, marker)
        plan = plan_reply(req, cfg.default_max_tokens)
        if cfg.charge == "reserve":
            cost = req.prompt_tokens + (req.max_tokens or cfg.default_max_tokens)
        else:
            cost = req.prompt_tokens + plan.completion_tokens
        # Admission and its record share one critical section, so the stats, the call log
        # and the window's most-in-any-window figures can never disagree.
        with self._lock:
            state = self._window.try_admit(cost)
            admitted = state.admitted
            self._log.add(
                SimCall(
                    request_id=ids.request_id,
                    client_request_id=ids.client_request_id,
                    status=200 if admitted else 429,
                    outcome="ok" if admitted else "rate_limited",
                    admitted=admitted,
                    charged=cost if admitted else 0,
                    prompt_tokens=req.prompt_tokens if admitted else 0,
                    completion_tokens=plan.completion_tokens if admitted else 0,
                    body_hash=req.digest.hex(),
                    marker=marker,
                    arrived_at=ids.arrived_at,
                    admitted_at=state.at if admitted else None,
                )
            )
        if not admitted:
            if state.too_large or state.reset_tokens > 0:
                what = f"tokens per {cfg.window_s:g}s: limit {cfg.tpm}, requested {cost}"
            else:
                what = f"requests per {cfg.window_s:g}s: limit {cfg.rpm}"
            message = f"Rate limit reached for {req.model} on {what}. Please try again later."
            return self._limited_reply(state, state.wait, message)
        if cfg.latency_max > 0:
            with self._lock:
                latency = self._rng.uniform(cfg.latency_min, cfg.latency_max)
            self._stopping.wait(latency)
        payload = completion_body(req, plan, cfg.chars_per_token, number)
        return json_reply(200, payload, self._rate_headers(state))

    def _rate_headers(self, state: WindowState) -> dict[str, str]:
        return state.headers() if self.config.ratelimit_headers else {}
