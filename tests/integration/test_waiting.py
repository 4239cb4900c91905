"""Waiting on a batch: told at once when no worker runs, and unbroken by an outage."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy.engine import make_url

from jobs import api, presence
from jobs.connections import shared_redis
from jobs.handles import BatchHandle, BatchProgress
from jobs.settings import Settings
from tests.support import (
    ROOT,
    TcpProxy,
    WorkerProcess,
    jsonl,
    line,
    settings_env,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_submit_wait_says_when_no_worker_consumes_then_finishes_once_one_starts(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "five.jsonl"
    path.write_bytes(jsonl(*(line(f"w{i}") for i in range(5))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "submit", str(path), "--wait"],
        env=settings_env(settings), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    started = time.monotonic()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    notice = f"batch-infer: no worker is consuming the queue: {presence.START_HINT}\n"
    # "Within seconds": the submit itself plus one presence check.
    wait_until(lambda: notice in lines, presence.ALIVE_FOR_S, "the no-worker notice")
    assert time.monotonic() - started < presence.ALIVE_FOR_S
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        assert proc.wait(timeout=90) == 0, lines
    finally:
        worker.stop()
    reader.join(10)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    assert [t for t in lines if t.startswith("batch-infer:")] == [notice]
    assert out.splitlines()[-1].endswith("ok 5  failed 0  running 0  queued 0")


def test_no_notice_while_a_worker_is_alive(settings: Settings, tmp_path: Path) -> None:
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_until(lambda: presence.live_workers(_redis(settings)) == 1, 15, "a live worker")
        notes: list[str] = []
        batch = api.submit_batch([line(f"n{i}") for i in range(3)], settings=settings)
        final = batch.wait(timeout=60, on_notice=notes.append)
    finally:
        worker.stop()
    assert (final.succeeded, notes) == (3, [])
    wait_until(lambda: presence.live_workers(_redis(settings)) == 0, 5, "the worker unmarked")


def _redis(settings: Settings) -> redis.Redis:
    assert settings.redis_url is not None
    return shared_redis(settings.redis_url)


def _through(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(False)


def test_wait_rides_out_a_postgres_outage_and_says_so_once(
    settings: Settings, tmp_path: Path
) -> None:
    assert settings.database_url is not None
    parsed = make_url(settings.database_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    waiter_settings = settings.replace(database_url=_through(settings.database_url, proxy))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    notes: list[str] = []
    outcome: list[BatchProgress | BaseException] = []
    try:
        worker.wait_ready()
        proxy.cut()
        batch = api.submit_batch([line(f"o{i}") for i in range(8)], settings=settings)
        handle = BatchHandle(batch.id, api.context(waiter_settings))

        def waiting() -> None:
            try:
                outcome.append(handle.wait(timeout=120, poll=0.1, on_notice=notes.append))
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                outcome.append(exc)

        thread = threading.Thread(target=waiting)
        thread.start()
        # The batch ends while the waiter cannot see it, over many of its polls.
        assert batch.wait(timeout=60).succeeded == 8
        time.sleep(1.0)
        assert outcome == []
        proxy.restore()
        thread.join(30)
    finally:
        proxy.close()
        worker.stop()
    assert len(outcome) == 1 and isinstance(outcome[0], BatchProgress), outcome
    assert outcome[0].succeeded == 8
    where = f"127.0.0.1:{proxy.port}/{parsed.database}"
    assert notes == [f"PostgreSQL at {where} is unreachable; still waiting"]


def test_wait_rides_out_a_redis_outage_and_says_so_once(settings: Settings, tmp_path: Path) -> None:
    assert settings.redis_url is not None
    parts = urlsplit(settings.redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    waiter_settings = settings.replace(redis_url=f"redis://127.0.0.1:{proxy.port}{parts.path}")
    notes: list[str] = []
    outcome: list[BatchProgress] = []
    batch = api.submit_batch([line(f"r{i}") for i in range(4)], settings=settings)
    handle = BatchHandle(batch.id, api.context(waiter_settings))
    proxy.cut()
    thread = threading.Thread(
        target=lambda: outcome.append(handle.wait(timeout=90, poll=0.1, on_notice=notes.append))
    )
    thread.start()
    # No worker yet: the batch cannot end before the waiter has tried Redis.
    wait_until(lambda: len(notes) == 1, 10, "the Redis notice")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        thread.join(90)
    finally:
        proxy.close()
        worker.stop()
    assert [p.succeeded for p in outcome] == [4]
    assert notes == [f"Redis at 127.0.0.1:{proxy.port} is unreachable; still waiting"]
