"""OpenAI-compatible chat-completions simulator on loopback, for the demo, tests and benchmarks.

It answers ``POST /v1/chat/completions`` like Heroku Managed Inference would: bearer-key
auth, request validation, deterministic usage and replies (including tool calls and
reasoning text), a strict sliding-window rate limit on requests and tokens with the
``x-ratelimit-*`` headers, and injectable faults (5xx, hangs, malformed bodies, a forced run
of one status). It counts what the provider would have charged so a benchmark can check the
client never exceeded the limits and never paid twice for the same body.

``GET /stats`` returns :class:`SimulatorStats` as JSON and ``POST /reset`` clears them; both
answer loopback clients only. Run standalone with ``python -m jobs.simulator --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Literal

from jobs.sim_http import MAX_BODY_BYTES, Reply, SimulatorServer, error_reply, json_reply
from jobs.sim_limits import (
    InvalidRequestError,
    SlidingWindow,
    WindowState,
    completion_body,
    parse_request,
    plan_reply,
)


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
    #: body is truncated JSON. Faulted calls are not admitted and charge nothing.
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 3600.0
    malformed_rate: float = 0.0
    #: Add ``Retry-After`` to 429s (Heroku documents none).
    retry_after: bool = False
    rate_limit_code: str = "rate_limit_exceeded"
    seed: int = 0

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
            )
            if bad
        ]
        for name in ("error_rate", "hang_rate", "malformed_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be between 0 and 1")
        if problems:
            raise ValueError("invalid SimulatorConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class SimulatorStats:
    """What the simulated provider saw and charged since start or the last reset."""

    calls: int = 0
    ok: int = 0
    rate_limited: int = 0
    client_errors: int = 0
    server_errors: int = 0
    hangs: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    max_requests_in_window: int = 0
    max_tokens_in_window: int = 0
    duplicate_bodies: int = 0

    def as_dict(self) -> dict[str, int]:
        """The stats as a plain JSON-ready dict."""
        return dataclasses.asdict(self)


class _Counters:
    """Mutable tallies behind :class:`SimulatorStats`; guarded by the simulator's lock."""

    def __init__(self) -> None:
        self.values = dict.fromkeys((f.name for f in dataclasses.fields(SimulatorStats)), 0)
        self.ok_bodies: dict[bytes, int] = {}


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
        self._counters = _Counters()
        self._numbers = itertools.count(1)
        self._error_flip = 0
        self._forced: tuple[int, float] | None = None
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

    def stats(self) -> SimulatorStats:
        """A snapshot of the counters plus the exact most-admitted-in-any-window figures."""
        with self._lock:
            values = dict(self._counters.values)
        values["max_requests_in_window"], values["max_tokens_in_window"] = (
            self._window.max_in_window()
        )
        return SimulatorStats(**values)

    def reset(self) -> None:
        """Clear the counters, the duplicate tracking and the rate-limit window."""
        with self._lock:
            self._counters = _Counters()
            self._window.reset()

    # -- request handling (runs on handler threads) --------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                self._counters.values[name] += amount

    def _forced_status(self) -> tuple[int, float] | None:
        with self._lock:
            if self._forced is None:
                return None
            status, until = self._forced
            left = until - time.monotonic()
            if left <= 0:
                self._forced = None
                return None
            return status, left

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").strip().partition(" ")
        with self._lock:
            key = self._key
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), key.encode()
        )

    def _draw_fault(self) -> str | None:
        cfg = self.config
        with self._lock:
            roll = self._rng.random()
        if roll < cfg.error_rate:
            return "error"
        if roll < cfg.error_rate + cfg.hang_rate:
            return "hang"
        if roll < cfg.error_rate + cfg.hang_rate + cfg.malformed_rate:
            return "malformed"
        return None

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
            state.headers(),
        )
        if self.config.retry_after:
            reply.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return reply

    def _forced_reply(self, status: int, left: float) -> Reply:
        if status == 429:
            self._count(rate_limited=1)
            state = dataclasses.replace(
                self._window.peek(0),
                remaining_requests=0,
                remaining_tokens=0,
                reset_requests=left,
                reset_tokens=left,
            )
            return self._limited_reply(state, left, "Rate limit reached (forced by the simulator).")
        if status >= 500:
            self._count(server_errors=1)
            return error_reply(
                status,
                "The server is unavailable (forced by the simulator).",
                "server_error",
                "service_unavailable",
            )
        self._count(client_errors=1)
        return error_reply(
            status, "Request refused (forced by the simulator).", "invalid_request_error", None
        )

    def _fault_reply(self, fault: str, number: int) -> Reply:
        if fault == "error":
            self._count(server_errors=1)
            with self._lock:
                self._error_flip += 1
                status = 500 if self._error_flip % 2 else 503
            message = "The server had an error while processing your request (simulated)."
            return error_reply(
                status,
                message,
                "server_error",
                "internal_error" if status == 500 else "service_unavailable",
            )
        if fault == "hang":
            self._count(hangs=1)
            self._stopping.wait(self.config.hang_seconds)
            reply = error_reply(
                504, "The upstream model timed out (simulated).", "server_error", "timeout"
            )
            reply.headers["Connection"] = "close"
            return reply
        self._count(malformed=1)
        return Reply(200, f'{{"id": "chatcmpl-sim-{number}", "choices": ['.encode(), {})

    def handle_chat(self, authorization: str | None, raw: bytes | None) -> Reply:
        """Answer one chat-completions call; ``raw`` is ``None`` when the body was too large."""
        number = next(self._numbers)
        reply = self._chat(authorization, raw, number)
        reply.headers["x-request-id"] = f"req-sim-{number}"
        return reply

    def _chat(self, authorization: str | None, raw: bytes | None, number: int) -> Reply:
        cfg = self.config
        self._count(calls=1)
        forced = self._forced_status()
        if forced is not None:
            return self._forced_reply(*forced)
        if not self._authorized(authorization):
            self._count(client_errors=1)
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
            self._count(client_errors=1)
            return json_reply(exc.status, exc.body())
        fault = self._draw_fault()
        if fault is not None:
            return self._fault_reply(fault, number)
        plan = plan_reply(req, cfg.default_max_tokens)
        if cfg.charge == "reserve":
            cost = req.prompt_tokens + (req.max_tokens or cfg.default_max_tokens)
        else:
            cost = req.prompt_tokens + plan.completion_tokens
        state = self._window.try_admit(cost)
        if not state.admitted:
            self._count(rate_limited=1)
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
        with self._lock:
            values = self._counters.values
            values["ok"] += 1
            values["prompt_tokens"] += req.prompt_tokens
            values["completion_tokens"] += plan.completion_tokens
            values["total_tokens"] += req.prompt_tokens + plan.completion_tokens
            seen = self._counters.ok_bodies.get(req.digest, 0) + 1
            self._counters.ok_bodies[req.digest] = seen
            if seen == 2:
                values["duplicate_bodies"] += 1
        return json_reply(200, payload, state.headers())


def _parse_latency(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground until SIGINT/SIGTERM, then print its stats."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.simulator", description=(__doc__ or "").partition("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument(
        "--key",
        default=os.environ.get("SIMULATOR_KEY", SimulatorConfig.key),
        help="bearer key to accept (default: $SIMULATOR_KEY, which keeps it out of `ps`)",
    )
    parser.add_argument("--model", action="append", help="accepted model id (repeatable)")
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--window", type=float, default=60.0, help="sliding window, seconds")
    parser.add_argument("--charge", choices=("reserve", "actual"), default="reserve")
    parser.add_argument("--chars-per-token", type=float, default=4.0)
    parser.add_argument("--default-max-tokens", type=int, default=4096)
    parser.add_argument("--context-tokens", type=int, default=262_144)
    parser.add_argument(
        "--latency", type=_parse_latency, default=(0.0, 0.0), help="MIN:MAX seconds"
    )
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--hang-rate", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=3600.0)
    parser.add_argument("--malformed-rate", type=float, default=0.0)
    parser.add_argument("--retry-after", action="store_true", help="send Retry-After on 429")
    parser.add_argument("--rate-limit-code", default="rate_limit_exceeded")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = SimulatorConfig(
            key=args.key,
            models=frozenset(args.model or SimulatorConfig.models),
            rpm=args.rpm,
            tpm=args.tpm,
            window_s=args.window,
            charge=args.charge,
            chars_per_token=args.chars_per_token,
            default_max_tokens=args.default_max_tokens,
            context_tokens=args.context_tokens,
            latency_min=args.latency[0],
            latency_max=args.latency[1],
            error_rate=args.error_rate,
            hang_rate=args.hang_rate,
            hang_seconds=args.hang_seconds,
            malformed_rate=args.malformed_rate,
            retry_after=args.retry_after,
            rate_limit_code=args.rate_limit_code,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sim = Simulator(config, host=args.host, port=args.port).start()
    print(sim.url, flush=True)
    while not done.wait(0.5):
        pass
    sim.stop()
    print(json.dumps(sim.stats().as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
