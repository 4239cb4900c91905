"""budgets: a batch's budget in tokens or dollars, why it is paused, and each call's
worst-case prompt

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without defaults: catalog-only, no table rewrite. A batch without a budget
    # has none; a call made before this revision counts its reported usage only.
    op.add_column("batches", sa.Column("budget_tokens", sa.BigInteger(), nullable=True))
    op.add_column("batches", sa.Column("budget_usd", sa.Float(), nullable=True))
    op.add_column("batches", sa.Column("paused_reason", sa.Text(), nullable=True))
    op.add_column("attempts", sa.Column("worst_prompt_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("attempts", "worst_prompt_tokens")
    op.drop_column("batches", "paused_reason")
    op.drop_column("batches", "budget_usd")
    op.drop_column("batches", "budget_tokens")
