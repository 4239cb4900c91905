"""calibration in the ledger: each call's raw prompt estimate and script

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: catalog-only, no table rewrite. Calls made
    # before this revision carry no estimate and teach the calibration nothing.
    op.add_column("attempts", sa.Column("est_prompt_tokens", sa.Integer(), nullable=True))
    op.add_column("attempts", sa.Column("script", sa.String(length=8), nullable=True))
    op.create_index(
        "ix_attempts_calibration",
        "attempts",
        ["model", "script", "id"],
        postgresql_where=sa.text("est_prompt_tokens IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_attempts_calibration", table_name="attempts")
    op.drop_column("attempts", "script")
    op.drop_column("attempts", "est_prompt_tokens")
