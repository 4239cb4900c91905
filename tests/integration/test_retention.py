"""Data retention against the real Postgres: old finished jobs lose their bodies,
everything else (recent jobs, queued and running ones, the ledger) stays."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from jobs import api, intake, reports, retention, store
from jobs.batchfile import BatchItem
from jobs.connections import celery_app
from jobs.constants import QUEUE_CONTROL, TASK_PURGE
from jobs.db import session_scope
from jobs.models import Attempt, Batch, Job, JobStatus
from jobs.settings import Settings
from jobs.validation import CheckedRequest
from tests.support import WorkerProcess, run_cli, run_python, settings_env

pytestmark = pytest.mark.integration

USAGE = (11, 7, 18)
BODY_COLUMNS = ("request", "response", "output_text", "reasoning_text", "tool_calls")


def item(n: int) -> BatchItem:
    body: dict[str, Any] = {
        "model": "kimi-k2-5",
        "messages": [{"role": "user", "content": f"secret question {n}"}],
        "max_tokens": 50,
    }
    return BatchItem(
        line=n,
        custom_id=f"req-{n}",
        request=CheckedRequest(body=body, model="kimi-k2-5", max_tokens=50, est_prompt_tokens=10),
    )


def make_batch(db: str, n: int) -> tuple[int, list[int]]:
    with session_scope(db) as s:
        batch_id, created = intake.create_batch(
            s, name="r", source="api", items=[item(i) for i in range(1, n + 1)]
        )
        assert created
        ids = s.execute(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id))
        return batch_id, list(ids.scalars())


def run(db: str, job_id: int, *, ok: bool = True) -> None:
    """Take a job through claim, one ledger row and a result, as a worker does."""
    with session_scope(db) as s:
        assert store.claim(s, job_id, lease_s=60) is not None
        number = store.begin_attempt(s, job_id, lease_s=60)
        assert number is not None
        store.finish_attempt(
            s, job_id, number, latency_ms=5, http_status=200 if ok else 400, usage=USAGE
        )
        if ok:
            assert store.record_success(
                s,
                job_id,
                response={"id": f"chatcmpl-{job_id}", "choices": [{"message": {"content": "a"}}]},
                output_text=f"secret answer {job_id}",
                reasoning_text="secret thoughts",
                tool_calls=[{"id": "t1", "function": {"name": "f", "arguments": "{}"}}],
                finish_reason="stop",
                usage=USAGE,
            )
        else:
            assert store.record_failure(s, job_id, code="rejected", message="400 bad request")


def age(db: str, job_ids: list[int], days: float) -> None:
    """Pretend the jobs finished ``days`` ago.

    Queued and running jobs get an old ``finished_at`` too: their status alone must protect them.
    """
    with session_scope(db) as s:
        s.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(finished_at=func.now() - dt.timedelta(days=days))
        )


def bodies(db: str, job_id: int) -> dict[str, Any]:
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return {name: getattr(job, name) for name in (*BODY_COLUMNS, "purged_at")}


def sql_nulls(db: str, job_id: int) -> dict[str, bool]:
    """Which body columns are SQL NULL (a JSONB column can also hold the JSON value null)."""
    columns = ", ".join(f"{name} IS NULL AS {name}" for name in BODY_COLUMNS)
    with session_scope(db) as s:
        row = s.execute(text(f"SELECT {columns} FROM jobs WHERE id = :id"), {"id": job_id})
        return dict(row.one()._mapping)


def ledger(db: str) -> tuple[int, int, int, int]:
    with session_scope(db) as s:
        row = s.execute(
            select(
                func.count(),
                func.sum(Attempt.prompt_tokens),
                func.sum(Attempt.completion_tokens),
                func.sum(Attempt.total_tokens),
            )
        ).one()
    return (row[0], row[1], row[2], row[3])


def kept_fields(db: str) -> list[tuple[Any, ...]]:
    """What retention must never change: per job, and per batch."""
    with session_scope(db) as s:
        jobs = s.execute(
            select(
                Job.id,
                Job.status,
                Job.custom_id,
                Job.model,
                Job.prompt_tokens,
                Job.completion_tokens,
                Job.total_tokens,
                Job.attempts,
                Job.error_code,
                Job.last_error,
                Job.created_at,
                Job.finished_at,
            ).order_by(Job.id)
        ).all()
        batches = s.execute(
            select(
                Batch.id,
                Batch.status,
                Batch.total,
                Batch.queued,
                Batch.running,
                Batch.succeeded,
                Batch.failed,
                Batch.cancelled,
            ).order_by(Batch.id)
        ).all()
    return [tuple(r) for r in jobs] + [tuple(r) for r in batches]


def test_old_finished_jobs_lose_bodies_and_nothing_else(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    _, (old_ok, old_failed, recent_ok, queued, running) = make_batch(db, 5)
    cancelled_batch, (cancelled,) = make_batch(db, 1)
    run(db, old_ok)
    run(db, old_failed, ok=False)
    run(db, recent_ok)
    with session_scope(db) as s:
        assert store.claim(s, running, lease_s=600) is not None
        assert store.cancel_batch(s, cancelled_batch) == 1
    age(db, [old_ok, old_failed, cancelled, queued, running], days=40)
    age(db, [recent_ok], days=3)
    ledger_before, kept_before = ledger(db), kept_fields(db)
    usage_before = reports.usage(db)

    report = retention.purge(settings, older_than=30)

    assert (report.jobs, report.dry_run) == (3, False)
    for job_id in (old_ok, old_failed, cancelled):
        purged = bodies(db, job_id)
        assert purged["purged_at"] is not None
        assert all(purged[name] is None for name in BODY_COLUMNS), purged
        assert all(sql_nulls(db, job_id).values()), sql_nulls(db, job_id)
    assert bodies(db, recent_ok)["output_text"] == f"secret answer {recent_ok}"
    for job_id in (recent_ok, queued, running):
        kept = bodies(db, job_id)
        assert kept["purged_at"] is None
        assert kept["request"]["messages"][0]["content"].startswith("secret question")
    assert ledger(db) == ledger_before == (3, 33, 21, 54)
    assert reports.usage(db) == usage_before
    assert kept_fields(db) == kept_before

    # A second run finds nothing left to do; the running job can still finish.
    assert retention.purge(settings, older_than=30).jobs == 0
    with session_scope(db) as s:
        assert store.record_failure(s, running, code="x", message="y")


def test_dry_run_counts_and_changes_nothing(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    _, ids = make_batch(db, 4)
    for job_id in ids:
        run(db, job_id)
    age(db, ids[:3], days=10)

    report = retention.purge(settings, older_than=7, dry_run=True)

    assert (report.jobs, report.chunks, report.dry_run) == (3, 0, True)
    assert all(bodies(db, job_id)["purged_at"] is None for job_id in ids)
    assert all(bodies(db, job_id)["output_text"] for job_id in ids)
    assert retention.purge(settings, older_than=7).jobs == 3


def test_purge_works_in_chunks(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    batch_id, _ = make_batch(db, 23)
    with session_scope(db) as s:
        s.execute(
            update(Job)
            .where(Job.batch_id == batch_id)
            .values(
                status=JobStatus.SUCCEEDED,
                output_text="secret",
                finished_at=func.now() - dt.timedelta(days=2),
            )
        )

    report = retention.purge(settings, older_than=1, chunk_size=5)

    assert (report.jobs, report.chunks) == (23, 5)  # 5 + 5 + 5 + 5 + 3
    with session_scope(db) as s:
        left = s.execute(
            select(func.count()).where(Job.batch_id == batch_id, Job.request.is_not(None))
        ).scalar_one()
        stamps = s.execute(select(func.count(func.distinct(Job.purged_at)))).scalar_one()
    assert left == 0
    # now() is the transaction's start time: one distinct stamp per chunk transaction.
    assert stamps == 5


def test_a_locked_row_is_skipped_not_waited_on(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    _, ids = make_batch(db, 3)
    for job_id in ids:
        run(db, job_id)
    age(db, ids, days=5)
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with session_scope(db) as s:
            s.execute(select(Job.id).where(Job.id == ids[1]).with_for_update())
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        result: list[retention.PurgeReport] = []
        purger = threading.Thread(
            target=lambda: result.append(retention.purge(settings, older_than=1))
        )
        purger.start()
        purger.join(30)
        assert not purger.is_alive(), "purge waited on a locked row"
    finally:
        release.set()
        holder.join(30)
    assert result[0].jobs == 2
    assert bodies(db, ids[1])["purged_at"] is None
    assert retention.purge(settings, older_than=1).jobs == 1


def test_cutoff_as_a_datetime_and_bad_arguments(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    _, ids = make_batch(db, 2)
    for job_id in ids:
        run(db, job_id)
    age(db, ids[:1], days=2)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    report = retention.purge(db, older_than=cutoff)
    assert (report.jobs, report.cutoff) == (1, cutoff)
    with pytest.raises(ValueError, match="timezone-aware"):
        retention.purge(settings, older_than=dt.datetime(2020, 1, 1))
    with pytest.raises(ValueError, match="older_than"):
        retention.purge(settings, older_than=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        retention.purge(settings, older_than=1, chunk_size=0)
    # A retention longer than the calendar purges nothing rather than failing.
    assert retention.purge(settings, older_than=10**9).jobs == 0


def test_purged_jobs_read_as_purged_and_cannot_be_retried(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    batch_id, (ok, failed) = make_batch(db, 2)
    run(db, ok)
    run(db, failed, ok=False)
    age(db, [ok, failed], days=9)
    retention.purge(settings, older_than=8)

    result = api.get_job(ok, settings=settings).result()
    assert result.purged and result.purged_at is not None
    assert (result.status, result.output_text, result.response) == ("succeeded", None, None)
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens) == USAGE

    lines = list(api.get_batch(batch_id, settings=settings).results())
    # Still a chat completion, with no choices and the ledger's usage.
    purged = lines[0]["response"]
    assert (purged["status_code"], purged["request_id"]) == (200, None)
    assert purged["body"]["choices"] == []
    assert purged["body"]["object"] == "chat.completion"
    assert tuple(purged["body"]["usage"].values()) == USAGE
    assert lines[0]["error"]["code"] == "purged"
    assert "retention" in lines[0]["error"]["message"]
    assert lines[1]["error"] == {"code": "rejected", "message": "400 bad request"}

    # The failed job has no request left to send: retry leaves it failed.
    with session_scope(db) as s:
        assert store.retry_batch(s, batch_id) == 0
        status = s.execute(select(Job.status).where(Job.id == failed)).scalar_one()
    assert status == JobStatus.FAILED


def purge_cli(settings: Settings, *args: str, days: str = "30") -> subprocess.CompletedProcess[str]:
    return run_cli(settings, *args, env=settings_env(settings) | {"RESULT_RETENTION_DAYS": days})


def test_cli_purge_and_results(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    batch_id, ids = make_batch(db, 3)
    for job_id in ids:
        run(db, job_id)
    age(db, ids[:2], days=45)
    age(db, ids[2:], days=5)

    dry = purge_cli(settings, "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would purge 2 jobs finished more than 30 days ago")
    assert bodies(db, ids[0])["purged_at"] is None

    done = purge_cli(settings, "purge")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith("purged 2 jobs finished more than 30 days ago")

    explicit = purge_cli(settings, "purge", "--older-than-days", "1")
    assert explicit.stdout.startswith("purged 1 jobs finished more than 1 days ago")

    results = purge_cli(settings, "results", str(batch_id))
    assert results.returncode == 0, results.stderr
    lines = [json.loads(x) for x in results.stdout.splitlines()]
    assert [x["custom_id"] for x in lines] == ["req-1", "req-2", "req-3"]
    assert all(x["error"]["code"] == "purged" for x in lines)
    assert all(x["response"]["status_code"] == 200 for x in lines)
    assert "secret" not in results.stdout


def test_cli_purge_with_retention_off_and_bad_arguments(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    _, ids = make_batch(db, 1)
    run(db, ids[0])
    age(db, ids, days=400)
    off = purge_cli(settings, "purge", days="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith("nothing purged: RESULT_RETENTION_DAYS=0")
    assert bodies(db, ids[0])["purged_at"] is None

    for args, days, message in (
        (["purge", "--older-than-days", "-3"], "30", "not a number of days"),
        (["purge", "--older-than-days", "soon"], "30", "not a number of days"),
        (["purge"], "forever", "RESULT_RETENTION_DAYS must be an integer"),
    ):
        proc = purge_cli(settings, *args, days=days)
        assert proc.returncode == 2, proc.stdout
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2  # argparse adds a usage line


@pytest.mark.parametrize(("days", "scheduled"), [("30", True), ("0", False)])
def test_worker_app_registers_the_task_and_schedules_it_only_with_retention(
    settings: Settings, days: str, scheduled: bool
) -> None:
    code = (
        "import json; from worker.app import app; import worker.tasks; "
        "print(json.dumps({'tasks': sorted(app.tasks), 'schedule': app.conf.beat_schedule}, "
        "default=str))"
    )
    proc = run_python(
        settings, "-c", code, env=settings_env(settings) | {"RESULT_RETENTION_DAYS": days}
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    assert TASK_PURGE in found["tasks"]
    assert ("purge" in found["schedule"]) is scheduled
    if scheduled:
        assert found["schedule"]["purge"]["task"] == TASK_PURGE


def test_purge_task_runs_in_a_worker(settings: Settings, tmp_path: Path) -> None:
    db = settings.database_url
    assert db is not None
    _, ids = make_batch(db, 2)
    for job_id in ids:
        run(db, job_id)
    age(db, ids[:1], days=31)
    worker = WorkerProcess(
        settings, tmp_path / "worker.log", concurrency=2, extra_env={"RESULT_RETENTION_DAYS": "30"}
    )
    try:
        worker.wait_ready()
        celery_app(settings).send_task(TASK_PURGE, queue=QUEUE_CONTROL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and bodies(db, ids[0])["purged_at"] is None:
            time.sleep(0.2)
    finally:
        worker.stop()
    assert bodies(db, ids[0])["purged_at"] is not None, worker.log()
    assert bodies(db, ids[1])["purged_at"] is None
    assert "event=purge jobs=1" in worker.log()
    with session_scope(db) as s:
        assert s.execute(text("SELECT count(*) FROM attempts")).scalar_one() == 2
