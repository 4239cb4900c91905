"""attachments in the ledger: each call records the alias and the key hash of the
attachment it went through, so that a pool of keys can be reported by attachment and
each key's throttle bucket rebuilt from its own calls

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows of earlier calls keep NULL: they went through the one attachment of old.
    op.add_column("attempts", sa.Column("attachment", sa.String(length=64), nullable=True))
    op.add_column("attempts", sa.Column("key_hash", sa.String(length=12), nullable=True))


def downgrade() -> None:
    op.drop_column("attempts", "key_hash")
    op.drop_column("attempts", "attachment")
