"""Publish queued jobs from Postgres to Celery as capacity frees up.

Postgres holds every job; Redis holds only a window of them. Each sweep:

1. hands back running jobs whose lease expired (their worker died);
2. counts bulk jobs already published and unfinished, and tops that up to
   DISPATCH_WINDOW, oldest first; interactive jobs are always published;
3. publishes one small message per job (its id, no body) by task name, then
   marks the rows. The rows stay locked (``FOR UPDATE SKIP LOCKED``) until
   commit, so two dispatchers never publish the same job, and a failed publish
   rolls back and loses nothing.

A redelivered or duplicated message is harmless: the worker's claim ignores a
job that is finished or leased to someone else.
"""

from __future__ import annotations

from celery import Celery

from jobs import store
from jobs.constants import QUEUE_BULK, QUEUE_INTERACTIVE, TASK_RUN_JOB
from jobs.db import session_scope
from jobs.logfmt import log_event
from jobs.models import Priority
from jobs.settings import Settings


def queue_for(priority: int) -> str:
    return QUEUE_INTERACTIVE if priority == Priority.INTERACTIVE else QUEUE_BULK


def dispatch(settings: Settings, app: Celery) -> int:
    """Run one sweep; returns how many jobs were published."""
    assert settings.database_url is not None
    # Its own transaction: the batch rows it touches are not held while publishing.
    with session_scope(settings.database_url) as session:
        recovered = store.requeue_stuck(session)
    with session_scope(settings.database_url) as session:
        room = settings.dispatch_window - store.outstanding_bulk(session)
        picked = store.dispatchable(
            session, bulk_room=room, redeliver_after_s=settings.dispatch_redeliver_after
        )
        if picked:
            with app.producer_or_acquire() as producer:
                for job_id, priority, _ in picked:
                    app.send_task(
                        TASK_RUN_JOB, args=[job_id], queue=queue_for(priority), producer=producer
                    )
            store.mark_dispatched(session, [job_id for job_id, _, _ in picked])
    if recovered:
        log_event("requeued", jobs=recovered, reason="lease expired")
    for job_id, priority, batch_id in picked:
        log_event("queued", job=job_id, batch=batch_id, status="queued", queue=queue_for(priority))
    return len(picked)
