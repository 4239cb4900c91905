"""The batch state machine (see :mod:`jobs.store`): OpenAI's statuses and their times."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update

from jobs.models import BATCH_ENDED, BatchStatus, File, FileRole, WebhookEvent
from jobs.store.counts import fold_moves
from jobs.store.jobs import CANCELLED_CODE, EXPIRED_CODE, stop_batch_jobs
from jobs.store.tables import Tx
from jobs.store.tables import batches_table as _batches

#: The webhook event of each status a batch can end in.
EVENTS = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}


def cancel_batch(session: Tx, batch_id: int) -> int:
    """Cancel a batch: ``cancelling`` until its calls on the wire end, then ``cancelled``.

    Every job that has not sent its request ends at once (:func:`stop_batch_jobs`);
    workers still holding such a job find it cancelled and release its throttle slot
    without calling. Returns how many jobs were stopped; an ended batch is left as it is.
    """
    b = _batches.c
    started = session.execute(
        update(_batches)
        .where(
            b.id == batch_id,
            b.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)),
            b.expired_at.is_(None),
        )
        .values(status=BatchStatus.CANCELLING, cancelling_at=func.now())
        .returning(b.id)
    ).one_or_none()
    if started is None:
        return 0
    stopped = stop_batch_jobs(
        session, batch_id, CANCELLED_CODE, "cancelled before its request was sent"
    )
    # The batch's row is this transaction's already: its counters show the cancel at once.
    fold_moves(session, batch_id)
    return stopped


def expire_batch(session: Tx, batch_id: int) -> int:
    """The batch's completion window closed: stop its unsent jobs, as a cancel does.

    It is ``finalizing`` until its calls on the wire end, then ``expired``; returns how
    many jobs were stopped.
    """
    b = _batches.c
    started = session.execute(
        update(_batches)
        .where(b.id == batch_id, b.status.in_((BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)))
        .values(
            status=BatchStatus.FINALIZING,
            expired_at=func.now(),
            finalizing_at=func.coalesce(b.finalizing_at, func.now()),
        )
        .returning(b.id)
    ).one_or_none()
    if started is None:
        return 0
    stopped = stop_batch_jobs(
        session, batch_id, EXPIRED_CODE, "not started within the completion window"
    )
    fold_moves(session, batch_id)
    return stopped


def expired_batches(session: Tx, *, limit: int = 100) -> list[int]:
    """Running batches whose completion window has closed."""
    b = _batches.c
    return list(
        session.execute(
            select(b.id)
            .where(b.status == BatchStatus.IN_PROGRESS, b.expires_at < func.now())
            .order_by(b.id)
            .limit(limit)
        ).scalars()
    )


#: How long after a cancel or an expiry workers keep looking for its waiting jobs: longer
#: than any wait (a window for a slot, a backoff, a read timeout's retry).
STOPPING_FOR_S = 600.0


def stopping_batches(session: Tx) -> list[int]:
    """Batches cancelled or expired lately: a worker may still hold their jobs, waiting.

    The jobs themselves ended ``cancelled`` when the batch stopped; the worker threads
    that wait for their slot (or a retry) learn it from this list and let them go.
    """
    b = _batches.c
    recent = func.now() - dt.timedelta(seconds=STOPPING_FOR_S)
    return list(
        session.execute(
            select(b.id).where(or_(b.cancelling_at > recent, b.expired_at > recent))
        ).scalars()
    )


def validating_batches(session: Tx, *, older_than_s: float, limit: int = 100) -> list[int]:
    """Batches still ``validating`` this long after they were created (their task was lost)."""
    b = _batches.c
    return list(
        session.execute(
            select(b.id)
            .where(
                b.status == BatchStatus.VALIDATING,
                b.created_at < func.now() - dt.timedelta(seconds=older_than_s),
            )
            .order_by(b.id)
            .limit(limit)
        ).scalars()
    )


def lock_validating(session: Tx, batch_id: int) -> bool:
    """Lock a ``validating`` batch for its validation; ``False`` if it is not (or is taken)."""
    b = _batches.c
    row = session.execute(
        select(b.id)
        .where(b.id == batch_id, b.status == BatchStatus.VALIDATING)
        .with_for_update(skip_locked=True)
    ).one_or_none()
    return row is not None


def accept_batch(session: Tx, batch_id: int, count: int) -> None:
    """The file was valid and its ``count`` jobs are stored: the batch runs."""
    b = _batches.c
    session.execute(
        update(_batches)
        .where(b.id == batch_id, b.status == BatchStatus.VALIDATING)
        .values(
            status=BatchStatus.IN_PROGRESS,
            in_progress_at=func.now(),
            total=count,
            queued=count,
        )
    )


def reject_batch(session: Tx, batch_id: int, errors: list[dict[str, Any]], *, notify: bool) -> bool:
    """The file was not valid: the batch ``failed`` with the file's errors, and no jobs."""
    b = _batches.c
    row = session.execute(
        update(_batches)
        .where(b.id == batch_id, b.status == BatchStatus.VALIDATING)
        .values(
            status=BatchStatus.FAILED, failed_at=func.now(), finished_at=func.now(), errors=errors
        )
        .returning(b.id)
    ).one_or_none()
    if row is not None and notify:
        _event(session, batch_id, BatchStatus.FAILED)
    return row is not None


def end_empty(session: Tx, batch_id: int, *, notify: bool) -> None:
    """A batch stored with no jobs at all has nothing to run: it is completed at once."""
    b = _batches.c
    row = session.execute(
        update(_batches)
        .where(b.id == batch_id, b.status == BatchStatus.IN_PROGRESS)
        .values(status=BatchStatus.COMPLETED, completed_at=func.now(), finished_at=func.now())
        .returning(b.id)
    ).one_or_none()
    if row is not None and notify:
        _event(session, batch_id, BatchStatus.COMPLETED)


def pause_batch(session: Tx, batch_id: int, reason: str) -> bool:
    """Pause a running batch's calls (its budget ran out, :mod:`jobs.budget`): it stays
    ``in_progress``, its jobs stay queued and the dispatcher leaves them be."""
    b = _batches.c
    row = session.execute(
        update(_batches)
        .where(b.id == batch_id, b.status == BatchStatus.IN_PROGRESS, b.paused_reason.is_(None))
        .values(paused_reason=reason)
        .returning(b.id)
    ).one_or_none()
    return row is not None


def set_budget(session: Tx, batch_id: int, *, tokens: int | None, usd: float | None) -> bool:
    """Give a batch a new budget, which resumes it if paused; ``False`` if it has ended."""
    b = _batches.c
    row = session.execute(
        update(_batches)
        .where(b.id == batch_id, b.status.not_in(BATCH_ENDED))
        .values(budget_tokens=tokens, budget_usd=usd, paused_reason=None)
        .returning(b.id)
    ).one_or_none()
    return row is not None


def finalizable(session: Tx, *, limit: int = 100) -> list[int]:
    """Batches whose jobs have all ended and that wait for :func:`end_batch`."""
    b = _batches.c
    return list(
        session.execute(
            select(b.id)
            .where(
                b.status.in_((BatchStatus.FINALIZING, BatchStatus.CANCELLING)),
                b.queued == 0,
                b.running == 0,
            )
            .order_by(b.id)
            .limit(limit)
        ).scalars()
    )


def lock_finalizable(session: Tx, batch_id: int) -> bool:
    """Lock a batch that waits for :func:`end_batch`; ``False`` if it does not (or is taken)."""
    b = _batches.c
    row = session.execute(
        select(b.id)
        .where(
            b.id == batch_id,
            b.status.in_((BatchStatus.FINALIZING, BatchStatus.CANCELLING)),
            b.queued == 0,
            b.running == 0,
        )
        .with_for_update(skip_locked=True)
    ).one_or_none()
    return row is not None


@dataclass(frozen=True)
class BatchFile:
    """An output or error file to name on an ending batch."""

    id: str
    role: FileRole
    filename: str
    bytes: int


def end_batch(
    session: Tx, batch_id: int, files: Sequence[BatchFile], *, notify: bool
) -> BatchStatus:
    """The batch has ended: its files, its final status, and the event of that status.

    The caller holds the batch's lock (:func:`lock_finalizable`). ``cancelling`` ends
    ``cancelled``, an expired batch ``expired``, any other ``completed``.
    """
    b = _batches.c
    row = session.execute(select(b.status, b.expired_at).where(b.id == batch_id)).one()
    if row.status == BatchStatus.CANCELLING:
        final, stamp = BatchStatus.CANCELLED, "cancelled_at"
    elif row.expired_at is not None:
        final, stamp = BatchStatus.EXPIRED, "expired_at"
    else:
        final, stamp = BatchStatus.COMPLETED, "completed_at"
    # A batch run again by retry_batch drops the files of its previous end.
    session.execute(delete(File).where(File.batch_id == batch_id))
    for file in files:
        session.execute(
            insert(File).values(
                id=file.id,
                purpose="batch_output",
                role=file.role,
                filename=file.filename,
                bytes=file.bytes,
                batch_id=batch_id,
            )
        )
    ids = {file.role: file.id for file in files}
    values: dict[str, Any] = {
        "status": final,
        "finished_at": func.now(),
        "output_file_id": ids.get(FileRole.OUTPUT),
        "error_file_id": ids.get(FileRole.ERROR),
    }
    if final != BatchStatus.EXPIRED:  # expired_at was set when the window closed
        values[stamp] = func.now()
    session.execute(update(_batches).where(b.id == batch_id).values(values))
    if notify:
        _event(session, batch_id, final)
    return final


def new_id(prefix: str) -> str:
    """A public id: ``prefix`` and 24 random hex digits (``file-…``, ``evt_…``)."""
    return prefix + secrets.token_hex(12)


def _event(session: Tx, batch_id: int, status: BatchStatus) -> None:
    """Queue the webhook event of a batch that ended (:mod:`jobs.webhooks` delivers it)."""
    session.execute(
        insert(WebhookEvent).values(id=new_id("evt_"), type=EVENTS[status], batch_id=batch_id)
    )
