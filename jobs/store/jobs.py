"""The job state machine (see :mod:`jobs.store`); each change moves its batch's counts
(:mod:`jobs.store.counts`)."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Interval,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from jobs.models import Batch, BatchStatus, Job, JobStatus
from jobs.store.counts import move_counts
from jobs.store.tables import Tx
from jobs.store.tables import attempts_table as _attempts
from jobs.store.tables import batches_table as _batches
from jobs.store.tables import jobs_table as _jobs

ABANDONED = "abandoned"
#: ``error_code`` of the jobs a cancel or an expiry stopped before their call.
CANCELLED_CODE = "batch_cancelled"
EXPIRED_CODE = "batch_expired"

# The statements a worker runs for every job use the tables, not the mapped
# classes: an ORM-enabled UPDATE synchronises the session's identity map after
# it runs, which took a fifth of a busy worker's GIL time for rows nobody had loaded.
# They are also built once, with bind parameters, rather than per call: building
# a statement and its cache key cost more CPU than running it.


def _param(column: ColumnElement[Any]) -> BindParameter[Any]:
    """A bind parameter named and typed after ``column``; ``None`` binds SQL NULL, as in
    ``values(column=None)``, also for a JSON column (whose type would bind JSON null)."""
    kind = column.type
    if isinstance(kind, JSON):
        kind = JSONB(none_as_null=True)
    return bindparam(column.key, type_=kind)


#: ``lease_until`` a lease from now: bind ``lease`` to a :class:`datetime.timedelta`.
_LEASE = func.now() + bindparam("lease", type_=Interval())


def _lease(lease_s: float) -> dt.timedelta:
    return dt.timedelta(seconds=lease_s)


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
    #: Why its batch's calls are paused (:mod:`jobs.budget`), or ``None``.
    paused_reason: str | None = None
    #: Its batch had a budget when it was claimed.
    budgeted: bool = False


def claim(session: Tx, job_id: int, *, lease_s: float) -> ClaimedJob | None:
    """Take a job for running, or ``None`` when it is finished or leased elsewhere."""
    claimed = claim_many(session, [job_id], lease_s=lease_s)
    return claimed[0] if claimed else None


def claim_many(session: Tx, job_ids: Sequence[int], *, lease_s: float) -> list[ClaimedJob]:
    """Take the jobs of one message for running, in id order (the lock order of cancels):
    those that are finished or leased elsewhere are left out. Three statements whatever
    the number of jobs."""
    rows = session.execute(_CLAIM_READ, {"job_ids": sorted(set(job_ids))}).all()
    claimed: list[ClaimedJob] = []
    moved: dict[int | None, int] = {}
    for job in rows:
        # A purged job has no body to send; purging only touches finished jobs and
        # retry_batch leaves purged ones alone, so this is a guard, not a path.
        if job.request is None:
            continue
        if job.status == JobStatus.QUEUED:
            moved[job.batch_id] = moved.get(job.batch_id, 0) + 1
        elif not (
            job.status == JobStatus.RUNNING and job.lease_until and job.lease_until < job.now
        ):
            continue
        claimed.append(
            ClaimedJob(
                id=job.id,
                batch_id=job.batch_id,
                custom_id=job.custom_id,
                model=job.model,
                request=job.request,
                est_prompt_tokens=job.est_prompt_tokens,
                priority=job.priority,
                attempts=job.attempts,
                paused_reason=job.paused_reason,
                budgeted=bool(job.budgeted),
            )
        )
    for batch_id, n in moved.items():
        move_counts(session, batch_id, "queued", "running", n)
    if claimed:
        session.execute(
            _CLAIM_WRITE, {"job_ids": [job.id for job in claimed], "lease": _lease(lease_s)}
        )
    return claimed


_j, _b, _a = _jobs.c, _batches.c, _attempts.c

#: The jobs of one claim: bind ``job_ids`` to a list.
_JOB_IDS = bindparam("job_ids", type_=ARRAY(BigInteger))

_CLAIM_READ = (
    select(
        _j.id,
        _j.batch_id,
        _j.custom_id,
        _j.model,
        _j.request,
        _j.est_prompt_tokens,
        _j.priority,
        _j.attempts,
        _j.status,
        _j.lease_until,
        func.now().label("now"),
        _b.paused_reason,
        or_(_b.budget_tokens.is_not(None), _b.budget_usd.is_not(None)).label("budgeted"),
    )
    .select_from(_jobs.outerjoin(_batches, _b.id == _j.batch_id))
    .where(_j.id == any_(_JOB_IDS))
    .order_by(_j.id)
    # Wait for a dispatcher that still holds the rows: it publishes before it commits.
    # Only the jobs' rows, locked in id order: the batch's is left to cancels and folds.
    .with_for_update(of=_jobs)
)
_CLAIM_WRITE = (
    update(_jobs)
    .where(_j.id == any_(_JOB_IDS))
    .values(
        status=JobStatus.RUNNING,
        started_at=func.coalesce(_j.started_at, func.now()),
        lease_until=_LEASE,
    )
)


def begin_attempt(
    session: Tx,
    job_id: int,
    *,
    lease_s: float,
    est_prompt_tokens: int | None = None,
    script: str | None = None,
    max_tokens: int | None = None,
    worst_prompt_tokens: int | None = None,
    attachment: str | None = None,
    key_hash: str | None = None,
) -> int | None:
    """Write the ledger row for a call about to be made; returns its attempt number.

    Returns ``None`` when the job is no longer running (cancelled meanwhile).
    The row exists before the call, so a worker killed mid-call still leaves a
    trace of a call the provider may have charged. ``est_prompt_tokens``, ``script``
    and ``max_tokens`` are what the calibration learns from once the answer is recorded;
    ``worst_prompt_tokens`` and ``max_tokens``, what a budget counts until then;
    ``attachment`` and ``key_hash``, which attachment of the pool it goes through.
    """
    number = session.execute(
        _ATTEMPT_COUNT, {"job_id": job_id, "lease": _lease(lease_s)}
    ).one_or_none()
    if number is None:
        return None
    session.execute(
        _ATTEMPT_ROW,
        {
            "job_id": job_id,
            "number": number.attempts,
            "model": number.model,
            "est_prompt_tokens": est_prompt_tokens,
            "script": script,
            "max_tokens": max_tokens,
            "worst_prompt_tokens": worst_prompt_tokens,
            "attachment": attachment,
            "key_hash": key_hash,
        },
    )
    return int(number.attempts)


_ATTEMPT_COUNT = (
    update(_jobs)
    .where(_j.id == bindparam("job_id", type_=_j.id.type), _j.status == JobStatus.RUNNING)
    .values(attempts=_j.attempts + 1, calling=True, lease_until=_LEASE)
    .returning(_j.attempts, _j.model)
)
_ATTEMPT_ROW = insert(_attempts).values(
    {
        **{
            column: _param(_a[column])
            for column in (
                "job_id",
                "number",
                "model",
                "est_prompt_tokens",
                "script",
                "max_tokens",
                "worst_prompt_tokens",
                "attachment",
                "key_hash",
            )
        },
        "started_at": func.now(),
    }
)


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
    ends_job: bool = False,
) -> None:
    """Complete the ledger row of one call with what the provider reported.

    The job is no longer ``calling``: until its next call, a cancel stops it. With
    ``ends_job`` the caller ends the job in the same transaction, which says so in the
    same write of the job's row (:func:`record_success`).
    """
    if not ends_job:
        session.execute(_NOT_CALLING, {"job_id": job_id})
    session.execute(
        _ATTEMPT_END,
        {
            "of_job": job_id,
            "of_number": number,
            "latency_ms": latency_ms,
            "http_status": http_status,
            "error_kind": error_kind,
            "error_message": error_message,
            "request_id": request_id,
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[2],
        },
    )


_NOT_CALLING = (
    update(_jobs).where(_j.id == bindparam("job_id", type_=_j.id.type)).values(calling=False)
)
_ATTEMPT_END = (
    update(_attempts)
    .where(
        # Not named after the columns: those names are the SET clause's.
        _a.job_id == bindparam("of_job", type_=_a.job_id.type),
        _a.number == bindparam("of_number", type_=_a.number.type),
    )
    .values(
        {
            column: _param(_a[column])
            for column in (
                "latency_ms",
                "http_status",
                "error_kind",
                "error_message",
                "request_id",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
            )
        }
    )
)


def _finish(session: Tx, job_id: int, status: JobStatus, **values: Any) -> bool:
    row = session.execute(
        _finish_statement(tuple(sorted(values))), {"job_id": job_id, "status": status, **values}
    ).one_or_none()
    if row is None:
        return False
    move_counts(session, row.batch_id, "running", status.value)
    return True


@functools.cache
def _finish_statement(columns: tuple[str, ...]) -> Any:
    """The UPDATE ending a running job with a ``status`` and values for ``columns``."""
    return (
        update(_jobs)
        .where(_j.id == bindparam("job_id", type_=_j.id.type), _j.status == JobStatus.RUNNING)
        .values(
            {
                "status": _param(_j.status),
                "finished_at": func.now(),
                "lease_until": None,
                "calling": False,
                **{column: _param(_j[column]) for column in columns},
            }
        )
        .returning(_j.batch_id)
    )


def record_success(
    session: Tx,
    job_id: int,
    *,
    request_id: str | None = None,
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
        request_id=request_id,
        error_code=None,
        last_error=None,
        error_status=None,
        error_body=None,
    )


def record_failure(
    session: Tx,
    job_id: int,
    *,
    code: str,
    message: str,
    http_status: int | None = None,
    request_id: str | None = None,
    body: dict[str, Any] | None = None,
) -> bool:
    """Fail a job for good; ``http_status`` and ``body`` keep the provider's answer, if any."""
    return _finish(
        session,
        job_id,
        JobStatus.FAILED,
        error_code=code,
        last_error=message,
        error_status=http_status,
        request_id=request_id,
        error_body=body,
    )


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
            calling=False,
            last_error=reason if reason is not None else j.last_error,
        )
        .returning(j.batch_id)
    ).one_or_none()
    if row is None:
        return False
    move_counts(session, row.batch_id, "running", "queued")
    return True


def renew_leases(session: Tx, job_ids: Sequence[int], *, lease_s: float) -> None:
    """Extend the leases of running jobs whose worker is alive (its heartbeat).

    A row another transaction holds is skipped, never waited for: the worker's own
    writes lock several of its jobs at once, in id order, and a renewal waiting in
    another order would deadlock with them. A job skipped is being written (a call's
    ledger row renews its lease) or is renewed at the next beat, well inside its lease.
    """
    j = _jobs.c
    free = (
        select(j.id)
        .where(j.id.in_(job_ids), j.status == JobStatus.RUNNING)
        .with_for_update(skip_locked=True)
    )
    session.execute(
        update(_jobs)
        .where(j.id.in_(free.scalar_subquery()))
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


def stop_batch_jobs(session: Tx, batch_id: int, code: str, message: str) -> int:
    """End ``cancelled`` every job of the batch that has no call on the wire; returns how many.

    The rows are locked first, in id order like every other transaction; a job whose
    worker has just put its call on the wire (``calling``) is re-read after the lock
    and left to finish.
    """
    j = _jobs.c
    picked = (
        select(j.id, j.status.label("was"))
        .where(
            j.batch_id == batch_id,
            or_(
                j.status == JobStatus.QUEUED,
                and_(j.status == JobStatus.RUNNING, j.calling.is_(False)),
            ),
        )
        .order_by(j.id)
        .with_for_update()
        .cte("picked")
    )
    rows = session.execute(
        update(_jobs)
        .where(j.id == picked.c.id)
        .values(
            status=JobStatus.CANCELLED,
            finished_at=func.now(),
            dispatched_at=None,
            lease_until=None,
            error_code=code,
            last_error=message,
        )
        .returning(picked.c.was)
    ).all()
    was = [row.was for row in rows]
    move_counts(session, batch_id, "queued", "cancelled", was.count(JobStatus.QUEUED))
    move_counts(session, batch_id, "running", "cancelled", was.count(JobStatus.RUNNING))
    return len(was)


def stop_job(session: Tx, job_id: int) -> bool:
    """End one running job of a stopping batch ``cancelled``, if it has no call on the wire.

    What a worker does when its waiting job is woken by a cancel or an expiry that could
    not stop it at once (a call of it was on the wire then). ``False``: not stopped.
    """
    j, b = _jobs.c, _batches.c
    code = case(
        (b.status == BatchStatus.CANCELLING, CANCELLED_CODE),
        (b.expired_at.is_not(None), EXPIRED_CODE),
        else_=None,
    )
    row = session.execute(
        update(_jobs)
        .where(
            j.id == job_id,
            j.status == JobStatus.RUNNING,
            j.calling.is_(False),
            j.batch_id == b.id,
            or_(b.status == BatchStatus.CANCELLING, b.expired_at.is_not(None)),
        )
        .values(
            status=JobStatus.CANCELLED,
            finished_at=func.now(),
            lease_until=None,
            error_code=code,
            last_error="not sent: its batch was stopped",
        )
        .returning(j.batch_id)
    ).one_or_none()
    if row is None:
        return False
    move_counts(session, row.batch_id, "running", "cancelled")
    return True


def is_finished(session: Tx, job_id: int) -> bool:
    """Whether the job has ended (a cancel ended it while its worker still held it)."""
    j = _jobs.c
    status = session.execute(select(j.status).where(j.id == job_id)).scalar_one_or_none()
    return status is None or status in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    )


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
                finalizing_at=None,
                completed_at=None,
                output_file_id=None,
                error_file_id=None,
            )
        )
    return len(ids)
