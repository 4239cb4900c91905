"""A batch's counts of jobs by status, kept out of the jobs' way.

Every job of a batch moves between its counters two times or more (claimed, then
ended), and an update of the batch's row for each made every job of the batch queue
on that row's lock. A move is a row of ``batch_moves`` instead, written in the
transaction of the job's change (:func:`move_counts`); the dispatcher's sweep adds
the moves to the batch's row (:func:`fold_moves`), and readers add the moves not yet
added (:func:`live_counts`, :func:`live_count`), so a batch's counts are its jobs' as
last committed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, select, text
from sqlalchemy.sql.elements import ColumnElement

from jobs.store.tables import Tx
from jobs.store.tables import batches_table as _batches
from jobs.store.tables import moves_table as _moves


def move_counts(session: Tx, batch_id: int | None, frm: str, to: str, n: int = 1) -> None:
    """Move ``n`` jobs of a batch from counter ``frm`` to ``to``: a row of
    ``batch_moves``, added to the batch's row by :func:`fold_moves`."""
    if batch_id is None or n == 0 or frm == to:
        return
    session.execute(_move_statement(frm, to), {"batch_id": batch_id, "taken": -n, "given": n})


@functools.cache
def _move_statement(frm: str, to: str) -> Any:
    m = _moves.c
    return insert(_moves).values(
        {
            "batch_id": bindparam("batch_id", type_=m.batch_id.type),
            frm: bindparam("taken", type_=m.queued.type),
            to: bindparam("given", type_=m.queued.type),
        }
    )


#: A batch's counters, in the order of the columns.
COUNTERS = ("queued", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Counts:
    """A batch's jobs by status, as of now."""

    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


def live_count(name: str) -> ColumnElement[int]:
    """Counter ``name`` of the batch of the enclosing query over ``batches``, as of now:
    its row plus its moves not yet folded (at most a sweep's worth, found by index)."""
    m = _moves.c
    pending = select(func.coalesce(func.sum(m[name]), 0)).where(m.batch_id == _batches.c.id)
    return _batches.c[name] + pending.scalar_subquery()


def live_counts(session: Tx, batch_ids: Sequence[int]) -> dict[int, Counts]:
    """:class:`Counts` of these batches (unknown ones left out)."""
    columns = [live_count(name).label(name) for name in COUNTERS]
    rows = session.execute(select(_batches.c.id, *columns).where(_batches.c.id.in_(batch_ids)))
    return {row.id: Counts(*(int(value) for value in row[1:])) for row in rows}


def fold_moves(session: Tx, batch_id: int | None = None) -> list[int]:
    """Add the moves committed so far to their batches' counters (only ``batch_id``'s if
    given), and return the batches changed. A running batch left with none queued or
    running is finalizing (its files and final status are :func:`end_batch`'s).

    The batch rows are locked first, skipping those another transaction holds (their
    moves wait for the next fold), then their moves are deleted: every transaction
    takes a batch row before its moves, so two folds, or a fold and a cancel, never
    wait on each other in a circle.
    """
    rows = session.execute(_FOLD, {"batch_id": batch_id}).scalars().all()
    return [int(row) for row in rows]


#: ``:batch_id``: one batch, or NULL for all; returns the ids of the batches changed. The
#: SET expressions see the row as locked, and all of them its old values, so the
#: emptiness test adds the same sums as the counters.
_FOLD = text(
    """
WITH picked AS (
    SELECT id FROM batches
    WHERE id IN (
        SELECT batch_id FROM batch_moves
        WHERE CAST(:batch_id AS bigint) IS NULL OR batch_id = CAST(:batch_id AS bigint)
    )
    ORDER BY id
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM batch_moves USING picked WHERE batch_moves.batch_id = picked.id
    RETURNING batch_moves.*
), summed AS (
    SELECT batch_id, sum(queued) AS queued, sum(running) AS running,
           sum(succeeded) AS succeeded, sum(failed) AS failed, sum(cancelled) AS cancelled
    FROM moved GROUP BY batch_id
)
UPDATE batches SET
    queued = batches.queued + summed.queued,
    running = batches.running + summed.running,
    succeeded = batches.succeeded + summed.succeeded,
    failed = batches.failed + summed.failed,
    cancelled = batches.cancelled + summed.cancelled,
    status = CASE
        WHEN batches.queued + summed.queued = 0 AND batches.running + summed.running = 0
             AND batches.status = 'in_progress' THEN 'finalizing'
        ELSE batches.status END,
    finalizing_at = CASE
        WHEN batches.queued + summed.queued = 0 AND batches.running + summed.running = 0
             AND batches.status = 'in_progress' THEN now()
        ELSE batches.finalizing_at END
FROM summed WHERE batches.id = summed.batch_id
RETURNING batches.id
"""
)
