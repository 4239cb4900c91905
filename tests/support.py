"""Helpers shared by the test modules: databases, settings, worker processes."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from devstack import procs
from devstack.procs import free_port
from jobs import db
from jobs.attachments import pool_variables
from jobs.environment import worker_argv
from jobs.settings import Settings
from jobs.validation import RequestLimits

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "test-key-" + secrets.token_hex(8)


def _admin_conninfo(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )


def create_database(server_url: str, prefix: str = "bi_test") -> str:
    """Create an empty database next to ``server_url``; returns its SQLAlchemy URL."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(_admin_conninfo(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    db.dispose_all()
    name = make_url(url).database
    with psycopg.connect(_admin_conninfo(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(
    database_url: str, redis_url: str, inference_url: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "inference_url": inference_url,
        "inference_key": TEST_KEY,
        "read_timeout": 10.0,
        "connect_timeout": 2.0,
        "backoff_base": 0.05,
        "backoff_max": 0.5,
        "max_attempts": 3,
        "dispatch_interval": 0.2,
        "window_margin_s": 0.0,
        # Far above what the tests' batches need, so that the throttle's pace (one bulk
        # call every window / rpm) does not set their speed; tests of the limits set
        # their own.
        "rpm": 6000,
        "tpm": 80_000_000,
    }
    values.update(overrides)
    return Settings(**values)


def scrubbed_env() -> dict[str, str]:
    """This process's environment without the settings a test gives a child itself."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INFERENCE_", "NIGHTLY_", "WEBHOOK_", "DAILY_BUDGET_"))
    }


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a child process read exactly ``settings``."""
    env = scrubbed_env()
    assert settings.database_url and settings.redis_url and settings.inference_url
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        INFERENCE_URL=settings.inference_url,
        INFERENCE_KEY=settings.inference_key,
        INFERENCE_RPM=str(settings.rpm),
        INFERENCE_TPM=str(settings.tpm),
        INFERENCE_READ_TIMEOUT=str(settings.read_timeout),
        INFERENCE_BACKOFF_BASE=str(settings.backoff_base),
        INFERENCE_BACKOFF_MAX=str(settings.backoff_max),
        INFERENCE_MAX_ATTEMPTS=str(settings.max_attempts),
        INFERENCE_AUTH_RETRY=str(settings.auth_retry_s),
        JOB_LEASE_SECONDS=str(settings.job_lease_seconds),
        DISPATCH_WINDOW=str(settings.dispatch_window),
        DISPATCH_REDELIVER_AFTER=str(settings.dispatch_redeliver_after),
        INFERENCE_WINDOW_MARGIN=str(settings.window_margin_s),
        DISPATCH_INTERVAL=str(settings.dispatch_interval),
        WORKER_CONCURRENCY=str(settings.worker_concurrency),
        PYTHONUNBUFFERED="1",
    )
    if settings.price is not None:
        env.update(
            INFERENCE_PRICE_INPUT=str(settings.price.input),
            INFERENCE_PRICE_OUTPUT=str(settings.price.output),
        )
    env |= pool_variables(settings.attachments)
    if settings.daily_budget_tokens is not None:
        env["DAILY_BUDGET_TOKENS"] = str(settings.daily_budget_tokens)
    if settings.daily_budget_usd is not None:
        env["DAILY_BUDGET_USD"] = str(settings.daily_budget_usd)
    if settings.webhook_url is not None:
        env.update(
            WEBHOOK_URL=settings.webhook_url,
            WEBHOOK_SECRET=settings.webhook_secret,
            WEBHOOK_BACKOFF_BASE=str(settings.webhook_backoff_base),
            WEBHOOK_BACKOFF_MAX=str(settings.webhook_backoff_max),
        )
    return env


class WorkerProcess(procs.WorkerProcess):
    """A real Celery worker in its own OS process, as on a dyno, on exactly ``settings``."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        concurrency: int = 20,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        argv = worker_argv(settings, concurrency=concurrency)
        super().__init__(argv, settings_env(settings) | (extra_env or {}), log_path, append=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        super().wait_ready(timeout)

    def stop(self, timeout: float = 40.0) -> int:
        return super().stop(timeout)


#: The API key the tests' web processes accept.
WEB_KEY = "sk-test-" + secrets.token_hex(12)


def start_web(settings: Settings, log_path: Path, **extra_env: str) -> procs.WebProcess:
    """``python -m web`` on exactly ``settings``, accepting :data:`WEB_KEY`; ready."""
    env = settings_env(settings) | {"API_KEYS": WEB_KEY} | extra_env
    web = procs.WebProcess(env, log_path)
    try:
        web.wait_ready()
    except BaseException:
        web.stop(10)
        raise
    return web


# The example request body from Heroku's Kimi K2.5 model page.
HEROKU_EXAMPLE: dict[str, Any] = {
    "model": "kimi-k2-5",
    "messages": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there! How can I assist you today?"},
        {"role": "user", "content": "What's the weather like in Portland, Oregon right now?"},
    ],
    "temperature": 0.5,
    "max_tokens": 100,
    "stream": False,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Fetches the current weather for a given city.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {
                            "type": "string",
                            "description": "The name of the city to get weather for.",
                        }
                    },
                    "required": ["city"],
                },
            },
        }
    ],
    "tool_choice": "auto",
    "top_p": 0.9,
}


#: Kimi K2.5's limits, as request validation sees them.
LIMITS = RequestLimits(
    context_tokens=262_144,
    tpm=800_000,
    default_max_tokens=4096,
    known_models=frozenset({"kimi-k2-5"}),
)


def backoff_range(failures: int, *, base: float, cap: float) -> tuple[float, float]:
    """The shortest and longest backoff after a job's ``failures``-th failed call.

    Worked out here from the policy as ``worker/retry.py`` states it, not by calling it:
    exponential with "equal jitter", uniform over ``[bound / 2, bound]`` with
    ``bound = min(cap, base * 2**(failures - 1))``.
    """
    bound = min(cap, base * 2.0 ** (failures - 1))
    return bound / 2, bound


def backoff_waits(calls: Sequence[tuple[dt.datetime, int]]) -> list[float]:
    """Seconds from the end of each call to the start of the next: the backoff between them.

    ``calls`` are one job's ledger rows in order, as ``(started_at, latency_ms)``. A row
    is written just before its call and its latency is rounded down to the ms, so each
    figure is never below the backoff the worker slept; it is above by the bookkeeping
    between two calls (ledger rows, the throttle).
    """
    return [
        (after - started).total_seconds() - latency_ms / 1000
        for (started, latency_ms), (after, _) in pairwise(calls)
    ]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout:g} s")
        time.sleep(0.1)


# Batch lines: a chat body, an OpenAI Batch input line, and JSONL bytes of lines.
def body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "kimi-k2-5", "messages": [{"role": "user", "content": text}], **extra}


def line(custom_id: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body(f"question {custom_id}"),
    }
    row.update(overrides)
    return row


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def run_python(
    settings: Settings, *argv: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``python *argv`` from the repository root, in ``env`` (default: exactly ``settings``)."""
    return subprocess.run(
        [sys.executable, *argv],
        env=settings_env(settings) if env is None else env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m jobs *args``, as an operator runs it."""
    return run_python(settings, "-m", "jobs", *args, env=env)


class TcpProxy:
    """A TCP forwarder on loopback that a test can cut and restore: a service outage
    (connections reset, new ones refused) without stopping the machine's server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone would not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: close with a reset, as a server that vanished does.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
