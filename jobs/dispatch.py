"""Publish queued jobs from Postgres to Celery as capacity frees up.

Postgres holds every job; Redis holds only a window of them. Each sweep:

1. hands back running jobs whose lease expired (their worker died);
2. counts bulk jobs already published and unfinished, and tops that up to the
   dispatch window, oldest first; interactive jobs are always published. The
   window follows the calls' latency (:func:`window_for`): between
   DISPATCH_WINDOW and DISPATCH_WINDOW_MAX, a minute's requests plus the calls
   that the recent latency keeps in flight at the limit;
3. publishes the jobs' ids by task name, no bodies: bulk jobs up to
   :data:`JOBS_PER_MESSAGE` a message, claimed and run together by one worker
   (:meth:`worker.runner.Runner.run_many`), and each interactive job in its own
   message, to start on the first free worker; then marks the rows. The rows stay
   locked (``FOR UPDATE SKIP LOCKED``) until commit, so two dispatchers never
   publish the same job, and a failed publish rolls back and loses nothing.

A redelivered or duplicated message is harmless: the worker's claim ignores a
job that is finished or leased to someone else.

When Redis comes back empty (a restart without persistence loses the queue),
the missing :data:`~jobs.constants.DISPATCH_EPOCH_KEY` tells the first sweep to
publish every queued job again at once, instead of waiting for
DISPATCH_REDELIVER_AFTER.

While the provider rejects every key of the pool (each key's circuit of
:mod:`jobs.circuit` is open), nothing is published but one probe job each time a
circuit is due; while one key is accepted, its attachment takes every job. While
the day's budget is spent (:mod:`jobs.daily_budget`), nothing at all.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import cast

from celery import Celery
from sqlalchemy import Table, and_, exists, func, or_, select, update

from jobs import circuit as key_circuit
from jobs import daily_budget, store
from jobs.connections import shared_redis
from jobs.constants import DISPATCH_EPOCH_KEY, QUEUE_BULK, QUEUE_INTERACTIVE, TASK_RUN_JOB
from jobs.db import transaction
from jobs.logfmt import log_event
from jobs.models import Attempt, Batch, Job, JobStatus, Priority
from jobs.settings import Settings
from jobs.store import Tx

_jobs = cast(Table, Job.__table__)
_batches = cast(Table, Batch.__table__)


def queue_for(priority: int) -> str:
    return QUEUE_INTERACTIVE if priority == Priority.INTERACTIVE else QUEUE_BULK


def dispatch(settings: Settings, app: Celery, *, requeue: bool = True) -> int:
    """Run one sweep; returns how many jobs were published.

    ``requeue=False`` skips step 1 and keeps the last full sweep's window, for a
    caller that sweeps many times a second.
    """
    assert settings.database_url is not None
    circuits = key_circuit.for_settings(settings)
    recovered = 0
    if requeue:
        # Its own transaction: the batch rows it touches are not held while publishing.
        with transaction(settings.database_url) as tx:
            recovered = store.requeue_stuck(tx)
    _detect_lost_queue(settings)
    if daily_budget.pause_reason(settings) is not None:
        # The day's budget is spent: nothing is published until it resumes.
        if recovered:
            log_event("requeued", jobs=recovered, reason="lease expired")
        return 0
    with transaction(settings.database_url) as tx:
        if all(circuit.is_open() for circuit in circuits):
            picked = dispatchable(
                tx,
                bulk_room=1,
                interactive_room=1,
                redeliver_after_s=settings.dispatch_redeliver_after,
            )[:1]
            # The probe lease outlasts one call, so a second probe waits for its answer.
            lease_s = settings.read_timeout + 60.0
            # The first circuit that is due (or closed meanwhile) takes it as its probe.
            if picked and all(c.claim_probe(picked[0][0], lease_s) < 0 for c in circuits):
                picked = []
        else:
            room = _window(settings, tx, fresh=requeue) - outstanding_bulk(tx)
            picked = dispatchable(
                tx, bulk_room=room, redeliver_after_s=settings.dispatch_redeliver_after
            )
        if picked:
            with app.producer_or_acquire() as producer:
                for ids, queue in messages(picked):
                    app.send_task(TASK_RUN_JOB, args=[ids], queue=queue, producer=producer)
            mark_dispatched(tx, [job_id for job_id, _, _ in picked])
    if recovered:
        log_event("requeued", jobs=recovered, reason="lease expired")
    for job_id, priority, batch_id in picked:
        log_event("queued", job=job_id, batch=batch_id, status="queued", queue=queue_for(priority))
    return len(picked)


#: Most bulk jobs one message carries.
JOBS_PER_MESSAGE = 10


def messages(picked: Sequence[tuple[int, int, int | None]]) -> list[tuple[list[int], str]]:
    """The messages that carry ``picked`` jobs, each as ``(job ids, queue)``.

    A message is a Celery delivery and a claim transaction, whatever the jobs it
    carries: sharing them is most of what a job costs the worker beyond its call.
    Bulk jobs are bounded by the dispatch window, so a message of several waits for
    no thread; interactive ones are not, and go one a message.
    """
    bulk = [job_id for job_id, priority, _ in picked if priority != Priority.INTERACTIVE]
    out = [
        ([job_id], QUEUE_INTERACTIVE)
        for job_id, priority, _ in picked
        if priority == Priority.INTERACTIVE
    ]
    for at in range(0, len(bulk), JOBS_PER_MESSAGE):
        out.append((bulk[at : at + JOBS_PER_MESSAGE], QUEUE_BULK))
    return out


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


def window_for(settings: Settings, session: Tx) -> int:
    """Bulk jobs to keep published: the request limit's minute plus what is in flight.

    By Little's law RPM / 60 x the latency calls are in flight at the limit, and a
    strict window admits a whole minute's requests at its roll, each of which needs a
    published job: RPM x (1 + latency / 60), with the latency a high percentile of the
    recent calls, between DISPATCH_WINDOW and DISPATCH_WINDOW_MAX. At 2-20 s calls
    that is DISPATCH_WINDOW (RPM + 50); at 90 s, 375 at 150 RPM.
    """
    low, high = settings.dispatch_window, settings.dispatch_window_max
    if high <= low:
        return low
    latency = recent_latency_s(session, settings.read_timeout)
    rpm = settings.pool_rpm
    in_flight = math.ceil(round(rpm * latency / 60.0, 6))
    return max(low, min(high, rpm + in_flight))


#: The window of the last full sweep, per database and limits. The latency it follows
#: moves over minutes, while jobs end many times a second: the sweeps a job's end
#: starts (``requeue=False``) reuse it rather than query the ledger each time.
_last_window: dict[tuple[str | None, int, int, int], int] = {}


def _window(settings: Settings, session: Tx, *, fresh: bool) -> int:
    key = (
        settings.database_url,
        settings.pool_rpm,
        settings.dispatch_window,
        settings.dispatch_window_max,
    )
    window = None if fresh else _last_window.get(key)
    if window is None:
        window = _last_window[key] = window_for(settings, session)
    return window


#: Finished calls the latency percentile is taken over.
LATENCY_SAMPLE = 200
LATENCY_PERCENTILE = 0.95


# -- the queries of a sweep ------------------------------------------------------------


def recent_latency_s(session: Tx, read_timeout: float) -> float:
    """The 95th percentile latency of the last finished calls, or the age of the oldest
    call still in flight if that is longer (0 with neither).

    A batch of long calls has none finished for a while; counting the calls in flight
    by their age so far grows the window while they run. Calls older than the read
    timeout have no worker waiting on them any more (it died), so they are left out.
    """
    a = cast(Table, Attempt.__table__).c
    recent = (
        select(a.latency_ms)
        .where(a.latency_ms.is_not(None))
        .order_by(a.started_at.desc())
        .limit(LATENCY_SAMPLE)
        .subquery()
    )
    p95_ms = session.execute(
        select(func.percentile_disc(LATENCY_PERCENTILE).within_group(recent.c.latency_ms))
    ).scalar_one()
    horizon = func.now() - dt.timedelta(seconds=read_timeout)
    oldest = session.execute(
        select(func.extract("epoch", func.now() - func.min(a.started_at))).where(
            a.latency_ms.is_(None), a.started_at > horizon
        )
    ).scalar_one()
    return max(float(p95_ms or 0) / 1000.0, float(oldest or 0.0))


def dispatchable(
    session: Tx, *, bulk_room: int, redeliver_after_s: float, interactive_room: int = 1000
) -> list[tuple[int, int, int | None]]:
    """Lock queued jobs to publish, as ``(id, priority, batch_id)``: interactive ones first,
    then up to ``bulk_room`` bulk ones. A paused batch's jobs wait (:mod:`jobs.budget`).

    A job published long ago and still queued lost its message (a Redis flush);
    it is published again. ``SKIP LOCKED`` keeps two dispatchers apart.
    """
    j = _jobs.c
    stale = func.now() - dt.timedelta(seconds=redeliver_after_s)
    b = _batches.c
    paused = exists().where(b.id == j.batch_id, b.paused_reason.is_not(None))
    ready = and_(
        j.status == JobStatus.QUEUED,
        or_(j.dispatched_at.is_(None), j.dispatched_at < stale),
        ~paused,
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
    """Mark every published, unstarted job unpublished: Redis lost their messages.

    The rows are locked in id order, the order in which a worker claims the jobs of a
    message, so that the two never wait on each other in a circle.
    """
    j = _jobs.c
    published = (
        select(j.id)
        .where(j.status == JobStatus.QUEUED, j.dispatched_at.is_not(None))
        .order_by(j.id)
        .with_for_update()
    )
    rows = session.execute(
        update(_jobs)
        .where(j.id.in_(published.scalar_subquery()), j.status == JobStatus.QUEUED)
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
