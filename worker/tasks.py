"""Thin Celery tasks; the work happens in :mod:`worker.runner` and :mod:`jobs`."""

from __future__ import annotations

from jobs import finalizing, retention, store, validating, webhooks
from jobs.api import submit_scheduled
from jobs.constants import (
    TASK_DELIVER_WEBHOOK,
    TASK_DISPATCH,
    TASK_FINALIZE_BATCH,
    TASK_NIGHTLY_BATCH,
    TASK_PURGE,
    TASK_REQUEUE_STUCK,
    TASK_RUN_JOB,
    TASK_VALIDATE_BATCH,
)
from jobs.db import session_scope
from jobs.dispatch import dispatch as dispatch_sweep
from jobs.logfmt import log_event
from worker.app import app, settings
from worker.runtime import get_runtime


@app.task(name=TASK_RUN_JOB, ignore_result=True)
def run_job(job_ids: int | list[int]) -> list[str]:
    # One id: a message published before messages carried several jobs.
    ids = [job_ids] if isinstance(job_ids, int) else job_ids
    return list(get_runtime(settings).runner.run_many(ids))


@app.task(name=TASK_DISPATCH, ignore_result=True)
def dispatch() -> int:
    return dispatch_sweep(settings, app)


@app.task(name=TASK_REQUEUE_STUCK, ignore_result=True)
def requeue_stuck() -> int:
    assert settings.database_url is not None
    with session_scope(settings.database_url) as session:
        count = store.requeue_stuck(session, limit=100_000)
    log_event("maintenance", requeued=count)
    return count


@app.task(name=TASK_PURGE, ignore_result=True)
def purge() -> int:
    # A schedule entry left in Redis from before retention was turned off does nothing.
    days = settings.result_retention_days
    if days == 0:
        log_event("purge", jobs=0, reason="RESULT_RETENTION_DAYS=0")
        return 0
    report = retention.purge(settings, older_than=days)
    log_event("purge", jobs=report.jobs, chunks=report.chunks, cutoff=report.cutoff.isoformat())
    return report.jobs


@app.task(name=TASK_NIGHTLY_BATCH, ignore_result=True)
def nightly_batch(source: str, name: str) -> int:
    assert settings.nightly_cron is not None
    batch = submit_scheduled(source, name=name, cron=settings.nightly_cron, settings=settings)
    log_event("nightly_batch", batch=batch.id, created=batch.created)
    return batch.id


@app.task(name=TASK_VALIDATE_BATCH, ignore_result=True)
def validate_batch(batch_id: int) -> str:
    outcome = validating.validate(settings, batch_id)
    if outcome == "accepted":
        get_runtime(settings).wake_dispatcher()
    return outcome


@app.task(name=TASK_FINALIZE_BATCH, ignore_result=True)
def finalize_batch(batch_id: int) -> str | None:
    final = finalizing.finalize(settings, batch_id)
    return final.value if final is not None else None


@app.task(name=TASK_DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(event_id: str, attempts: int) -> str:
    return webhooks.deliver(settings, event_id, attempts)
