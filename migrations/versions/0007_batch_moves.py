"""batch moves: a job's move between its batch's counters is a row, folded into the
batch by the dispatcher's sweep, so that the jobs of a batch no longer queue on its row

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTERS = ("queued", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "batch_moves",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=False),
        *(sa.Column(name, sa.Integer(), server_default="0", nullable=False) for name in _COUNTERS),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_moves")),
    )
    op.create_index(op.f("ix_batch_moves_batch_id"), "batch_moves", ["batch_id"])


def downgrade() -> None:
    # Moves not yet folded would be lost with the table: fold them first.
    op.execute(
        """
        UPDATE batches SET
            queued = batches.queued + m.queued,
            running = batches.running + m.running,
            succeeded = batches.succeeded + m.succeeded,
            failed = batches.failed + m.failed,
            cancelled = batches.cancelled + m.cancelled
        FROM (
            SELECT batch_id, sum(queued) AS queued, sum(running) AS running,
                   sum(succeeded) AS succeeded, sum(failed) AS failed,
                   sum(cancelled) AS cancelled
            FROM batch_moves GROUP BY batch_id
        ) AS m
        WHERE batches.id = m.batch_id
        """
    )
    op.drop_index(op.f("ix_batch_moves_batch_id"), table_name="batch_moves")
    op.drop_table("batch_moves")
