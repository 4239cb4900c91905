"""The job state machine, in SQL.

Every status change goes through this module so that the batch counters move in
the same transaction as the job row::

    queued ──claim──▶ running ──record_success──▶ succeeded
      ▲  │               │ └──────record_failure──▶ failed ──retry_batch──▶ queued
      │  └──cancel──▶ cancelled
      └────hand_back / requeue_stuck (lease expired)──┘

A ``running`` job is leased to one worker until ``lease_until``; a redelivered
task for it is ignored until the lease expires, and a finished job is never
claimed again, so a duplicate Celery message costs nothing.

The functions a worker runs for every job take a :data:`Tx`, an ORM session or
a Core connection. The worker passes a connection (:func:`jobs.db.transaction`):
in a profile of a busy worker, a session's own bookkeeping added about 45 % to
the CPU of each statement it ran.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Table, and_, case, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from jobs.batchfile import BatchItem
from jobs.models import Attempt, Batch, BatchStatus, Job, JobStatus, Priority

#: ``error_kind`` of a ledger row whose worker died before the answer was recorded.
ABANDONED = "abandoned"

#: The columns a batch's jobs are stored with (the others take their server defaults).
_COPY_JOBS = (
    "COPY jobs (batch_id, custom_id, priority, model, request, est_prompt_tokens, status, "
    "attempts) FROM STDIN"
)

# The statements a worker runs for every job use the tables, not the mapped
# classes: an ORM-enabled UPDATE synchronises the session's identity map after
# it runs, which took a fifth of a busy worker's GIL time for rows nobody had loaded.
_jobs = cast(Table, Job.__table__)
_batches = cast(Table, Batch.__table__)
_attempts = cast(Table, Attempt.__table__)

#: Where a transaction's statements run: a session, or a Core connection.
Tx = Session | Connection


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one job."""

    id: int
    batch_id: int | None
    custom_id: str
    model: str
    request: dict[str, Any]
    est_prompt_tokens: int
    priority: int
    attempts: int


def _move(session: Tx, batch_id: int | None, frm: str, to: str, n: int = 1) -> None:
    """Move ``n`` jobs of a batch between two counters, completing it when none are left.

    All expressions of one UPDATE see the row's old values, so the completion
    test applies the same deltas as the counters.
    """
    if batch_id is None or n == 0 or frm == to:
        return
    delta = {frm: -n, to: n}
    b = _batches.c
    empty = and_(
        b.queued + delta.get("queued", 0) == 0,
        b.running + delta.get("running", 0) == 0,
    )
    session.execute(
        update(_batches)
        .where(b.id == batch_id)
        .values(
            {
                frm: b[frm] - n,
                to: b[to] + n,
                "status": case(
                    (and_(empty, b.status == BatchStatus.IN_PROGRESS), BatchStatus.COMPLETED),
                    else_=b.status,
                ),
                # A cancelled batch is finished once its last running job is.
                "finished_at": case(
                    (and_(empty, b.finished_at.is_(None)), func.now()),
                    else_=b.finished_at,
                ),
            }
        )
    )


def _copy_jobs(
    session: Session, batch_id: int, items: Iterable[BatchItem], priority: Priority
) -> int:
    """Stream the items into ``jobs`` with one COPY; returns how many.

    The batched INSERTs it replaces were a third of a 100,000-line submission's time;
    with COPY the whole submission took 12.7 s instead of 21.7 s. psycopg sends the rows
    a buffer at a time, so memory stays bounded however many there are; an exception
    from ``items`` aborts the COPY, and with it the caller's transaction.
    """
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    count = 0
    with driver.cursor() as cursor, cursor.copy(_COPY_JOBS) as copy:
        for item in items:
            copy.write_row(
                (
                    batch_id,
                    item.custom_id,
                    int(priority),
                    item.request.model,
                    Jsonb(item.request.body),
                    item.request.est_prompt_tokens,
                    JobStatus.QUEUED.value,
                    0,
                )
            )
            count += 1
    return count


def create_batch(
    session: Session,
    *,
    name: str,
    source: str,
    items: Iterable[BatchItem],
    priority: Priority = Priority.BULK,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> tuple[int, bool]:
    """Store a batch and all its jobs; returns ``(batch_id, created)``.

    With an ``idempotency_key`` that already exists, nothing is written and the
    existing batch is returned with ``created=False``. ``items`` may be an iterator
    (a file streamed by :func:`jobs.batchfile.iter_batch_stream`): it is consumed as the
    rows are sent, and an exception it raises leaves the caller's transaction to roll back.
    """
    expected = len(items) if isinstance(items, Sequence) else 0
    values = {
        "name": name,
        "source": source,
        "status": BatchStatus.IN_PROGRESS,
        "idempotency_key": idempotency_key,
        "total": expected,
        "queued": expected,
        "meta": metadata or {},
    }
    if idempotency_key is not None:
        stmt = (
            pg_insert(Batch)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[Batch.idempotency_key])
            .returning(Batch.id)
        )
        batch_id = session.execute(stmt).scalar_one_or_none()
        if batch_id is None:
            existing = session.execute(
                select(Batch.id).where(Batch.idempotency_key == idempotency_key)
            ).scalar_one()
            return existing, False
    else:
        batch_id = session.execute(insert(Batch).values(**values).returning(Batch.id)).scalar_one()
    count = _copy_jobs(session, batch_id, items, priority)
    if not count:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(status=BatchStatus.COMPLETED, finished_at=func.now())
        )
    elif count != expected:
        session.execute(update(Batch).where(Batch.id == batch_id).values(total=count, queued=count))
    return batch_id, True


def create_job(
    session: Session,
    item: BatchItem,
    *,
    priority: Priority,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Store one job outside any batch (``enqueue``)."""
    return session.execute(
        insert(Job)
        .values(
            batch_id=None,
            custom_id=item.custom_id,
            priority=priority,
            model=item.request.model,
            request=item.request.body,
            est_prompt_tokens=item.request.est_prompt_tokens,
            status=JobStatus.QUEUED,
            meta=metadata or {},
        )
        .returning(Job.id)
    ).scalar_one()


def claim(session: Tx, job_id: int, *, lease_s: float) -> ClaimedJob | None:
    """Take a job for running, or ``None`` when it is finished or leased elsewhere."""
    j = _jobs.c
    job = session.execute(
        select(
            j.id,
            j.batch_id,
            j.custom_id,
            j.model,
            j.request,
            j.est_prompt_tokens,
            j.priority,
            j.attempts,
            j.status,
            j.lease_until,
            func.now().label("now"),
        )
        .where(j.id == job_id)
        # Wait for a dispatcher that still holds the row: it publishes before it commits.
        .with_for_update()
    ).one_or_none()
    # A purged job has no body to send; purging only touches finished jobs and
    # retry_batch leaves purged ones alone, so this is a guard, not a path.
    if job is None or job.request is None:
        return None
    if job.status == JobStatus.QUEUED:
        _move(session, job.batch_id, "queued", "running")
    elif not (job.status == JobStatus.RUNNING and job.lease_until and job.lease_until < job.now):
        return None
    session.execute(
        update(_jobs)
        .where(j.id == job_id)
        .values(
            status=JobStatus.RUNNING,
            started_at=func.coalesce(j.started_at, func.now()),
            lease_until=func.now() + dt.timedelta(seconds=lease_s),
        )
    )
    return ClaimedJob(
        id=job.id,
        batch_id=job.batch_id,
        custom_id=job.custom_id,
        model=job.model,
        request=job.request,
        est_prompt_tokens=job.est_prompt_tokens,
        priority=job.priority,
        attempts=job.attempts,
    )


def begin_attempt(session: Tx, job_id: int, *, lease_s: float) -> int | None:
    """Write the ledger row for a call about to be made; returns its attempt number.

    Returns ``None`` when the job is no longer running (cancelled meanwhile).
    The row exists before the call, so a worker killed mid-call still leaves a
    trace of a call the provider may have charged.
    """
    j = _jobs.c
    number = session.execute(
        update(_jobs)
        .where(j.id == job_id, j.status == JobStatus.RUNNING)
        .values(
            attempts=j.attempts + 1,
            lease_until=func.now() + dt.timedelta(seconds=lease_s),
        )
        .returning(j.attempts, j.model)
    ).one_or_none()
    if number is None:
        return None
    session.execute(
        insert(_attempts).values(
            job_id=job_id, number=number.attempts, model=number.model, started_at=func.now()
        )
    )
    return int(number.attempts)


def finish_attempt(
    session: Tx,
    job_id: int,
    number: int,
    *,
    latency_ms: int,
    http_status: int | None,
    error_kind: str | None = None,
    error_message: str | None = None,
    request_id: str | None = None,
    usage: tuple[int, int, int] = (0, 0, 0),
) -> None:
    """Complete the ledger row of one call with what the provider reported."""
    a = _attempts.c
    session.execute(
        update(_attempts)
        .where(a.job_id == job_id, a.number == number)
        .values(
            latency_ms=latency_ms,
            http_status=http_status,
            error_kind=error_kind,
            error_message=error_message,
            request_id=request_id,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            total_tokens=usage[2],
        )
    )


def _finish(session: Tx, job_id: int, status: JobStatus, **values: Any) -> bool:
    j = _jobs.c
    row = session.execute(
        update(_jobs)
        .where(j.id == job_id, j.status == JobStatus.RUNNING)
        .values(status=status, finished_at=func.now(), lease_until=None, **values)
        .returning(j.batch_id)
    ).one_or_none()
    if row is None:
        return False
    _move(session, row.batch_id, "running", status.value)
    return True


def record_success(
    session: Tx,
    job_id: int,
    *,
    response: dict[str, Any],
    output_text: str | None,
    reasoning_text: str | None,
    tool_calls: list[Any] | None,
    finish_reason: str | None,
    usage: tuple[int, int, int],
) -> bool:
    return _finish(
        session,
        job_id,
        JobStatus.SUCCEEDED,
        response=response,
        output_text=output_text,
        reasoning_text=reasoning_text,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        total_tokens=usage[2],
        error_code=None,
        last_error=None,
    )


def record_failure(session: Tx, job_id: int, *, code: str, message: str) -> bool:
    return _finish(session, job_id, JobStatus.FAILED, error_code=code, last_error=message)


def hand_back(session: Tx, job_id: int, *, reason: str | None = None) -> bool:
    """Return a running job to the queue (shutdown, throttle wait too long)."""
    j = _jobs.c
    row = session.execute(
        update(_jobs)
        .where(j.id == job_id, j.status == JobStatus.RUNNING)
        .values(
            status=JobStatus.QUEUED,
            dispatched_at=None,
            lease_until=None,
            last_error=reason if reason is not None else j.last_error,
        )
        .returning(j.batch_id)
    ).one_or_none()
    if row is None:
        return False
    _move(session, row.batch_id, "running", "queued")
    return True


def renew_leases(session: Tx, job_ids: Sequence[int], *, lease_s: float) -> None:
    """Extend the leases of running jobs whose worker is alive (its heartbeat)."""
    j = _jobs.c
    session.execute(
        update(_jobs)
        .where(j.id.in_(job_ids), j.status == JobStatus.RUNNING)
        .values(lease_until=func.now() + dt.timedelta(seconds=lease_s))
    )


def requeue_stuck(session: Tx, *, limit: int = 1000) -> int:
    """Hand back running jobs whose lease expired (their worker died)."""
    j = _jobs.c
    ids = (
        session.execute(
            select(j.id)
            .where(j.status == JobStatus.RUNNING, j.lease_until < func.now())
            .order_by(j.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    if ids:
        # The provider may have answered (and charged) these calls after their
        # worker died: the ledger keeps them, marked, instead of as calls in flight.
        a = _attempts.c
        session.execute(
            update(_attempts)
            .where(a.job_id.in_(ids), a.http_status.is_(None), a.error_kind.is_(None))
            .values(error_kind=ABANDONED, error_message="worker lost mid-call; outcome unknown")
        )
    return sum(hand_back(session, job_id, reason="worker lost; re-queued") for job_id in ids)


def cancel_batch(session: Session, batch_id: int) -> int:
    """Cancel every queued job of a batch; running ones finish and are recorded.

    Returns how many jobs were cancelled; a finished batch is left as it is.
    """
    # Job rows first, then the batch row: the order every other transaction
    # takes its locks in, so a cancel cannot deadlock with a running worker.
    ids = (
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, finished_at=func.now(), dispatched_at=None)
            .returning(Job.id)
        )
        .scalars()
        .all()
    )
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.IN_PROGRESS)
        .values(status=BatchStatus.CANCELLED)
    )
    _move(session, batch_id, "queued", "cancelled", len(ids))
    return len(ids)


def retry_batch(session: Session, batch_id: int) -> int:
    """Put the failed jobs of a batch back in the queue; the batch runs again.

    Jobs whose request was purged by retention cannot run again and stay failed.
    """
    ids = (
        session.execute(
            update(Job)
            .where(
                Job.batch_id == batch_id,
                Job.status == JobStatus.FAILED,
                Job.purged_at.is_(None),
            )
            .values(
                status=JobStatus.QUEUED,
                finished_at=None,
                dispatched_at=None,
                started_at=None,
                error_code=None,
            )
            .returning(Job.id)
        )
        .scalars()
        .all()
    )
    if ids:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(
                failed=Batch.failed - len(ids),
                queued=Batch.queued + len(ids),
                status=BatchStatus.IN_PROGRESS,
                finished_at=None,
            )
        )
    return len(ids)


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


@dataclass(frozen=True)
class RecentCall:
    """A call the ledger saw start within the last window (to re-seed a lost bucket)."""

    age_s: float
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int | None
    answered: bool


def recent_calls(session: Session, *, window_s: float, model: str) -> list[RecentCall]:
    """Calls started in the last ``window_s`` seconds, by the database's clock.

    A call still in flight has no usage yet: its job's prompt estimate stands in.
    """
    age = func.extract("epoch", func.now() - Attempt.started_at)
    rows = session.execute(
        select(
            age,
            Attempt.http_status,
            Attempt.prompt_tokens,
            Attempt.completion_tokens,
            Job.est_prompt_tokens,
            Job.request["max_tokens"].as_integer(),
        )
        .join(Job, Job.id == Attempt.job_id)
        .where(Attempt.model == model)
        .where(Attempt.started_at > func.now() - dt.timedelta(seconds=window_s))
        # A 429 was not admitted by the provider and holds no place in its window.
        .where(or_(Attempt.http_status.is_(None), Attempt.http_status != 429))
    )
    return [
        RecentCall(
            age_s=float(age_s),
            prompt_tokens=prompt if status is not None and prompt else est,
            completion_tokens=completion,
            max_tokens=max_tokens,
            answered=status is not None,
        )
        for age_s, status, prompt, completion, est, max_tokens in rows
    ]
