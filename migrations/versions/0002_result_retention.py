"""result retention: purged_at, and request may be NULL once purged

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Both are catalog-only changes: no table rewrite, a brief lock only.
    op.add_column("jobs", sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    op.alter_column(
        "jobs",
        "request",
        existing_type=postgresql.JSONB(astext_type=sa.Text()),
        nullable=True,
    )


def downgrade() -> None:
    # A purged body cannot come back; the empty object stands in for it.
    op.execute("UPDATE jobs SET request = '{}'::jsonb WHERE request IS NULL")
    op.alter_column(
        "jobs",
        "request",
        existing_type=postgresql.JSONB(astext_type=sa.Text()),
        nullable=False,
    )
    op.drop_column("jobs", "purged_at")
