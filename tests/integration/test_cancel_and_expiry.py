"""Cancel and expiry stop every job that has not sent its request, wherever it waits.

The batch here is paced by the throttle: a worker holds every job, most of them
waiting for a slot the next window will bring. Before, ``cancel`` found no queued
job, answered "cancelled 0", and every job was then called and billed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from devstack.simulator import Simulator
from jobs import api, files
from jobs.constants import throttle_log_key
from jobs.settings import Settings
from tests.support import WorkerProcess, jsonl, line, run_cli, wait_until

pytestmark = pytest.mark.integration

#: Calls the throttle lets through in the first window; the rest wait in the worker.
RPM = 1
JOBS = 20


def _slow_key(settings: Settings) -> Settings:
    # The bucket admits RPM calls a window: the worker's other threads wait for slots.
    return settings.replace(rpm=RPM, dispatch_window=JOBS + 5, window_margin_s=0.0)


def _all_held(batch: api.BatchHandle) -> bool:
    progress = batch.progress()
    return progress.queued == 0 and progress.running == JOBS - progress.succeeded


def test_cancel_stops_jobs_waiting_in_a_worker_for_their_slot(
    settings: Settings, simulator: Simulator, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    slow = _slow_key(settings)
    worker = WorkerProcess(slow, tmp_path / "worker.log", concurrency=40)
    try:
        worker.wait_ready()
        batch = api.submit_batch([line(f"c{i}") for i in range(JOBS)], settings=slow)
        # Every job is claimed by a worker thread: none is queued any more.
        wait_until(lambda: _all_held(batch), 30, "every job held by the worker")
        wait_until(lambda: simulator.stats().calls >= RPM, 30, "the first window's calls")
        cancel = run_cli(slow, "cancel", f"batch_{batch.id}")
        assert cancel.returncode == 0, cancel.stderr
        final = batch.wait(timeout=30)
        # The worker's waiting threads are woken and let go at once, not at their slot
        # a window later: each logs its job cancelled.
        wait_until(
            lambda: worker.log().count("event=cancelled ") == JOBS - RPM, 10, "waiters released"
        )
        calls_at_end = simulator.stats().calls
        time.sleep(2.0)  # any waiter that escaped would call now
        calls_later = simulator.stats().calls
    finally:
        worker.stop()
    assert cancel.stdout.startswith(f"batch {batch.id}: stopped {JOBS - RPM} jobs")
    assert (final.status, final.succeeded, final.cancelled) == ("cancelled", RPM, JOBS - RPM)
    assert calls_at_end == calls_later == RPM
    # The slots the stopped jobs held or awaited went back: only the calls made remain.
    bucket = throttle_log_key(slow.bucket_name)
    assert redis_conn.zcard(bucket) == RPM
    lines = list(batch.results("errors"))
    assert len(lines) == JOBS - RPM
    assert {r["error"]["code"] for r in lines} == {"batch_cancelled"}
    assert all(r["response"] is None for r in lines)
    assert len(list(batch.results("output"))) == RPM


def test_a_closed_completion_window_expires_the_batch_and_keeps_its_results(
    settings: Settings, simulator: Simulator, tmp_path: Path
) -> None:
    slow = _slow_key(settings)
    assert slow.database_url is not None
    upload = files.Upload(
        slow.database_url, filename="in.jsonl", purpose="batch", max_bytes=slow.max_upload_bytes
    )
    upload.write(jsonl(*(line(f"e{i}") for i in range(JOBS))))
    stored = upload.finish()
    worker = WorkerProcess(slow, tmp_path / "worker.log", concurrency=40)
    try:
        worker.wait_ready()
        batch = api.create_file_batch(
            stored.id, endpoint="/v1/chat/completions", completion_window="4s", settings=slow
        )
        final = batch.wait(timeout=40)
    finally:
        worker.stop()
    assert final.status == "expired"
    assert (final.succeeded, final.cancelled) == (RPM, JOBS - RPM)
    assert simulator.stats().calls == RPM
    errors = list(batch.results("errors"))
    assert len(errors) == JOBS - RPM
    assert {r["error"]["code"] for r in errors} == {"batch_expired"}
    outputs = list(batch.results("output"))
    assert len(outputs) == RPM and all(r["response"]["status_code"] == 200 for r in outputs)


def test_a_cli_batch_has_no_window_unless_one_is_given(
    settings: Settings, simulator: Simulator, tmp_path: Path
) -> None:
    slow = _slow_key(settings)
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(*(line(f"w{i}") for i in range(JOBS))))
    none = run_cli(slow, "submit", str(path))
    given = run_cli(slow, "submit", str(path), "--completion-window", "3s")
    bad = run_cli(slow, "submit", str(path), "--completion-window", "soon")
    assert none.returncode == given.returncode == 0, (none.stderr, given.stderr)
    assert bad.returncode == 2 and "completion_window" in bad.stderr
    first, second = api.get_batch(1, settings=slow), api.get_batch(2, settings=slow)
    worker = WorkerProcess(slow, tmp_path / "worker.log", concurrency=40)
    try:
        final = second.wait(timeout=40)
        assert first.progress().status == "in_progress", "no window: still running"
        first.cancel()
        first.wait(timeout=30)
    finally:
        worker.stop()
    assert final.status == "expired" and final.cancelled > 0
