"""The nightly schedule runs through redbeat: schedule and lock live in Redis,
and the scheduled batch is created once and run by a worker."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from jobs.connections import redis_client
from jobs.constants import REDBEAT_LOCK_KEY, REDBEAT_PREFIX
from jobs.db import session_scope
from jobs.models import Batch
from jobs.settings import Settings
from tests.support import ROOT, WorkerProcess, settings_env

pytestmark = pytest.mark.integration


@pytest.fixture
def scheduled(settings: Settings, nightly_file: Path, tmp_path: Path) -> Iterator[Settings]:
    """A beat process and a worker process, both with an every-minute nightly run."""
    nightly = settings.replace(nightly_cron="* * * * *", nightly_source=str(nightly_file))
    env = settings_env(nightly) | {"NIGHTLY_CRON": "* * * * *", "NIGHTLY_SOURCE": str(nightly_file)}
    log = open(tmp_path / "beat.log", "ab")  # noqa: SIM115 - closed below
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO"],
        env=env, cwd=ROOT, stdout=log, stderr=log,
    )  # fmt: skip
    worker = WorkerProcess(nightly, tmp_path / "worker.log", extra_env=env)
    try:
        worker.wait_ready()
        yield nightly
    finally:
        beat.terminate()
        beat.wait(30)
        log.close()
        worker.stop()


def test_nightly_batch_fires_once_from_redbeat(scheduled: Settings, tmp_path: Path) -> None:
    assert scheduled.database_url and scheduled.redis_url
    deadline = time.monotonic() + 90
    batch: Batch | None = None
    while time.monotonic() < deadline:
        with session_scope(scheduled.database_url) as s:
            batch = s.execute(select(Batch).where(Batch.source == "schedule")).scalar_one_or_none()
        if batch is not None and batch.status == "completed":
            break
        time.sleep(1)
    beat_log = (tmp_path / "beat.log").read_text()
    assert batch is not None, beat_log
    assert (batch.status, batch.total, batch.succeeded) == ("completed", 5, 5)
    assert batch.idempotency_key and batch.idempotency_key.startswith("schedule:nightly:")
    client = redis_client(scheduled.redis_url)
    try:
        keys = {k.decode() for k in client.keys(REDBEAT_PREFIX + "*")}
    finally:
        client.close()
    assert REDBEAT_PREFIX + "nightly-batch" in keys
    assert REDBEAT_LOCK_KEY in keys
