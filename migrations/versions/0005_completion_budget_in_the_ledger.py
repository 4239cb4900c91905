"""completion budget in the ledger: each call's max_tokens

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: catalog-only, no table rewrite. Calls made before this
    # revision teach the completion share nothing.
    op.add_column("attempts", sa.Column("max_tokens", sa.Integer(), nullable=True))
    op.create_index(
        "ix_attempts_completion_share",
        "attempts",
        ["model", "id"],
        postgresql_where=sa.text("max_tokens IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_attempts_completion_share", table_name="attempts")
    op.drop_column("attempts", "max_tokens")
