"""Helpers shared by the test modules: databases, settings, worker processes."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from jobs import db
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
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a child process read exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "NIGHTLY_"))}
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
    return env


class WorkerProcess:
    """A real Celery worker in its own OS process, as on a dyno."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        concurrency: int = 20,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "--pool", "threads", "--concurrency", str(concurrency),
            "--queues", "inference.interactive,inference.bulk,inference.control",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip
        env = settings_env(settings) | (extra_env or {})
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._log, stderr=self._log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            if "ready." in self.log():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout:g} s")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
