"""Data retention: delete the bodies of jobs that finished long ago.

A purge clears what users sent and what the model answered (``request``,
``response``, ``output_text``, ``reasoning_text``, ``tool_calls``) and sets
``purged_at``, so a purged job reads as "deleted by retention", not as missing
data. Everything the usage ledger and the counters need stays: the attempts
rows and their tokens, the job's status, custom_id, model, token counts, error
code and message, metadata and timestamps, and the batch counters.

Only jobs in a terminal state (succeeded, failed, cancelled) whose
``finished_at`` is older than the cutoff are touched; queued and running jobs
never are. The work is done in chunks of :data:`PURGE_CHUNK` rows, one short
transaction each, taking rows with ``FOR UPDATE SKIP LOCKED``: a purge of
millions of rows holds no long transaction, and a row a worker holds is left
for the next run instead of being waited on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, null, select, update
from sqlalchemy.orm import Session

from jobs.db import session_scope
from jobs.models import TERMINAL, Job
from jobs.settings import Settings

#: Rows purged per transaction.
PURGE_CHUNK = 5000

#: The columns that hold user content; each becomes NULL.
BODY_COLUMNS = ("request", "response", "output_text", "reasoning_text", "tool_calls")


@dataclass(frozen=True)
class PurgeReport:
    """What one purge did (or, with ``dry_run``, would do)."""

    #: Jobs finished before this instant were eligible.
    cutoff: dt.datetime
    #: Jobs whose bodies were deleted (with ``dry_run``: would be deleted).
    jobs: int
    #: Transactions that deleted something (0 for a dry run).
    chunks: int
    dry_run: bool


def _eligible(cutoff: dt.datetime) -> ColumnElement[bool]:
    return and_(
        Job.status.in_(TERMINAL),
        Job.finished_at < cutoff,
        Job.purged_at.is_(None),
    )


def purge_chunk(
    session: Session, *, cutoff: dt.datetime, after_id: int = 0, limit: int = PURGE_CHUNK
) -> list[int]:
    """Purge up to ``limit`` eligible jobs with ids above ``after_id`` in the caller's
    transaction; returns the purged ids in ascending order.

    Rows locked by another transaction (a worker, a cancel) are skipped.
    """
    picked = (
        select(Job.id)
        .where(Job.id > after_id, _eligible(cutoff))
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    ids = session.execute(
        update(Job)
        .where(Job.id.in_(select(picked.c.id)))
        # null(), not None: None in a JSONB column is stored as the JSON value 'null'.
        .values({name: null() for name in BODY_COLUMNS} | {"purged_at": func.now()})
        .returning(Job.id)
    ).scalars()
    return sorted(ids)


def _cutoff(session: Session, older_than: dt.datetime | int) -> dt.datetime:
    if isinstance(older_than, dt.datetime):
        if older_than.tzinfo is None:
            raise ValueError("older_than must be a timezone-aware datetime")
        return older_than
    if isinstance(older_than, bool) or older_than < 0:
        raise ValueError(f"older_than must be a number of days >= 0, got {older_than!r}")
    # The database's clock, the one that stamped finished_at.
    now: dt.datetime = session.execute(select(func.now())).scalar_one()
    try:
        return now - dt.timedelta(days=older_than)
    except OverflowError:
        return dt.datetime.min.replace(tzinfo=dt.UTC)


def purge(
    target: Settings | str,
    *,
    older_than: dt.datetime | int,
    dry_run: bool = False,
    chunk_size: int = PURGE_CHUNK,
) -> PurgeReport:
    """Delete the bodies of terminal jobs finished before ``older_than``.

    ``target`` is the settings (or the database URL) to work on; each chunk is
    its own transaction, so this cannot run inside a caller's session (use
    :func:`purge_chunk` for that). ``older_than`` is a timezone-aware cutoff or
    a number of days before the database's current time. With ``dry_run``
    nothing is written and the report counts the jobs that would be purged.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    url = target if isinstance(target, str) else target.database_url
    if url is None:
        raise ValueError("the settings have no database_url; resolve them first")
    with session_scope(url) as session:
        cutoff = _cutoff(session, older_than)
        if dry_run:
            count = session.execute(
                select(func.count()).select_from(Job).where(_eligible(cutoff))
            ).scalar_one()
            return PurgeReport(cutoff=cutoff, jobs=int(count), chunks=0, dry_run=True)
    total = chunks = last_id = 0
    while True:
        with session_scope(url) as session:
            ids = purge_chunk(session, cutoff=cutoff, after_id=last_id, limit=chunk_size)
        if not ids:
            break
        total += len(ids)
        chunks += 1
        last_id = ids[-1]
        if len(ids) < chunk_size:
            break
    return PurgeReport(cutoff=cutoff, jobs=total, chunks=chunks, dry_run=False)
