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

When Redis comes back empty (a restart without persistence loses the queue),
the missing :data:`~jobs.constants.DISPATCH_EPOCH_KEY` tells the first sweep to
publish every queued job again at once, instead of waiting for
DISPATCH_REDELIVER_AFTER.

While the provider rejects the key (the circuit of :mod:`jobs.circuit` is open),
nothing is published but one probe job each time the circuit is due.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import cast

from celery import Celery
from sqlalchemy import Table, and_, func, or_, select, update

from jobs import circuit as key_circuit
from jobs import store
from jobs.connections import shared_redis
from jobs.constants import DISPATCH_EPOCH_KEY, QUEUE_BULK, QUEUE_INTERACTIVE, TASK_RUN_JOB
from jobs.db import transaction
from jobs.logfmt import log_event
from jobs.models import Job, JobStatus, Priority
from jobs.settings import Settings
from jobs.store import Tx

_jobs = cast(Table, Job.__table__)


def queue_for(priority: int) -> str:
    return QUEUE_INTERACTIVE if priority == Priority.INTERACTIVE else QUEUE_BULK


def dispatch(settings: Settings, app: Celery, *, requeue: bool = True) -> int:
    """Run one sweep; returns how many jobs were published.

    ``requeue=False`` skips step 1, for a caller that sweeps many times a second.
    """
    assert settings.database_url is not None
    circuit = key_circuit.for_settings(settings)
    recovered = 0
    if requeue:
        # Its own transaction: the batch rows it touches are not held while publishing.
        with transaction(settings.database_url) as tx:
            recovered = store.requeue_stuck(tx)
    _detect_lost_queue(settings)
    with transaction(settings.database_url) as tx:
        if circuit.is_open():
            picked = dispatchable(
                tx,
                bulk_room=1,
                interactive_room=1,
                redeliver_after_s=settings.dispatch_redeliver_after,
            )[:1]
            # The probe lease outlasts one call, so a second probe waits for its answer.
            lease_s = settings.read_timeout + 60.0
            if picked and circuit.claim_probe(picked[0][0], lease_s) < 0:
                picked = []
        else:
            room = settings.dispatch_window - outstanding_bulk(tx)
            picked = dispatchable(
                tx, bulk_room=room, redeliver_after_s=settings.dispatch_redeliver_after
            )
        if picked:
            with app.producer_or_acquire() as producer:
                for job_id, priority, _ in picked:
                    app.send_task(
                        TASK_RUN_JOB, args=[job_id], queue=queue_for(priority), producer=producer
                    )
            mark_dispatched(tx, [job_id for job_id, _, _ in picked])
    if recovered:
        log_event("requeued", jobs=recovered, reason="lease expired")
    for job_id, priority, batch_id in picked:
        log_event("queued", job=job_id, batch=batch_id, status="queued", queue=queue_for(priority))
    return len(picked)


def _detect_lost_queue(settings: Settings) -> None:
    """Republish everything when Redis lost its data since the last sweep.

    Only the sweep whose ``SET NX`` wins resets the rows, so a restart costs one
    UPDATE, not one per worker. On a brand-new Redis this republishes jobs that
    were never lost: a duplicate message is harmless, a lost one is not.
    """
    assert settings.database_url is not None and settings.redis_url is not None
    if not shared_redis(settings.redis_url).set(DISPATCH_EPOCH_KEY, "1", nx=True):
        return
    with transaction(settings.database_url) as tx:
        forgotten = forget_published(tx)
    if forgotten:
        log_event("republishing", jobs=forgotten, reason="Redis lost its data")


# -- the queries of a sweep ------------------------------------------------------------


def dispatchable(
    session: Tx, *, bulk_room: int, redeliver_after_s: float, interactive_room: int = 1000
) -> list[tuple[int, int, int | None]]:
    """Lock queued jobs to publish, as ``(id, priority, batch_id)``: interactive ones first,
    then up to ``bulk_room`` bulk ones.

    A job published long ago and still queued lost its message (a Redis flush);
    it is published again. ``SKIP LOCKED`` keeps two dispatchers apart.
    """
    j = _jobs.c
    stale = func.now() - dt.timedelta(seconds=redeliver_after_s)
    ready = and_(
        j.status == JobStatus.QUEUED,
        or_(j.dispatched_at.is_(None), j.dispatched_at < stale),
    )
    picked: list[tuple[int, int, int | None]] = []
    for priority, limit in ((Priority.INTERACTIVE, interactive_room), (Priority.BULK, bulk_room)):
        if limit <= 0:
            continue
        rows = session.execute(
            select(j.id, j.batch_id)
            .where(ready, j.priority == priority)
            .order_by(j.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        picked.extend((job_id, int(priority), batch_id) for job_id, batch_id in rows)
    return picked


def forget_published(session: Tx) -> int:
    """Mark every published, unstarted job unpublished: Redis lost their messages."""
    j = _jobs.c
    rows = session.execute(
        update(_jobs)
        .where(j.status == JobStatus.QUEUED, j.dispatched_at.is_not(None))
        .values(dispatched_at=None)
        .returning(j.id)
    )
    return len(rows.all())


def outstanding_bulk(session: Tx) -> int:
    """Bulk jobs published to Redis and not finished: the dispatcher's window use."""
    j = _jobs.c
    return session.execute(
        select(func.count())
        .select_from(_jobs)
        .where(
            j.priority == Priority.BULK,
            or_(
                and_(j.status == JobStatus.QUEUED, j.dispatched_at.is_not(None)),
                j.status == JobStatus.RUNNING,
            ),
        )
    ).scalar_one()


def mark_dispatched(session: Tx, job_ids: Sequence[int]) -> None:
    session.execute(update(_jobs).where(_jobs.c.id.in_(job_ids)).values(dispatched_at=func.now()))
