"""files, the Batches API lifecycle, cancel of waiting jobs, provider errors, webhooks

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('in_progress', 'completed', 'cancelled')"
NEW_STATUSES = (
    "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', "
    "'expired', 'cancelling', 'cancelled')"
)
STAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def upgrade() -> None:
    op.drop_constraint(op.f("ck_batches_status"), "batches", type_="check")
    op.create_check_constraint(op.f("ck_batches_status"), "batches", NEW_STATUSES)
    op.add_column(
        "batches",
        sa.Column(
            "endpoint",
            sa.String(length=64),
            server_default="/v1/chat/completions",
            nullable=False,
        ),
    )
    op.add_column("batches", sa.Column("input_file_id", sa.String(length=64), nullable=True))
    op.add_column("batches", sa.Column("completion_window", sa.String(length=16), nullable=True))
    op.add_column("batches", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "batches",
        sa.Column("errors", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column("batches", sa.Column("output_file_id", sa.String(length=64), nullable=True))
    op.add_column("batches", sa.Column("error_file_id", sa.String(length=64), nullable=True))
    for stamp in STAMPS:
        op.add_column("batches", sa.Column(stamp, sa.DateTime(timezone=True), nullable=True))
    # Batches from before: each status reached, as well as it is known.
    op.execute("UPDATE batches SET in_progress_at = created_at")
    op.execute("UPDATE batches SET completed_at = finished_at WHERE status = 'completed'")
    op.execute(
        "UPDATE batches SET cancelling_at = COALESCE(finished_at, created_at), "
        "cancelled_at = finished_at WHERE status = 'cancelled'"
    )

    op.add_column(
        "jobs", sa.Column("calling", sa.Boolean(), server_default="false", nullable=False)
    )
    op.add_column("jobs", sa.Column("error_status", sa.SmallInteger(), nullable=True))
    op.add_column("jobs", sa.Column("request_id", sa.String(length=200), nullable=True))
    op.add_column(
        "jobs", sa.Column("error_body", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )

    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=8), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("purpose IN ('batch', 'batch_output')", name=op.f("ck_files_purpose")),
        sa.CheckConstraint("role IN ('input', 'output', 'error')", name=op.f("ck_files_role")),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_files_batch_id_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    op.create_index("ix_files_created_at", "files", ["created_at"])
    op.create_index(op.f("ix_files_batch_id"), "files", ["batch_id"])
    op.create_table(
        "file_chunks",
        sa.Column("file_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"],
            ["files.id"],
            name=op.f("fk_file_chunks_file_id_files"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("file_id", "seq", name=op.f("pk_file_chunks")),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.SmallInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_webhook_events_batch_id_batches"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    op.create_index(
        "ix_webhook_events_due",
        "webhook_events",
        ["next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_events_due", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_table("file_chunks")
    op.drop_index(op.f("ix_files_batch_id"), table_name="files")
    op.drop_index("ix_files_created_at", table_name="files")
    op.drop_table("files")
    for column in ("error_body", "request_id", "error_status", "calling"):
        op.drop_column("jobs", column)
    # The older schema knows three statuses: an unfinished batch is in progress, an
    # ended one completed (or cancelled).
    op.execute(
        "UPDATE batches SET status = CASE "
        "WHEN status IN ('validating', 'finalizing') THEN 'in_progress' "
        "WHEN status = 'cancelling' THEN 'cancelled' "
        "WHEN status IN ('failed', 'expired') THEN 'completed' ELSE status END"
    )
    op.drop_constraint(op.f("ck_batches_status"), "batches", type_="check")
    op.create_check_constraint(op.f("ck_batches_status"), "batches", OLD_STATUSES)
    for column in (
        *STAMPS,
        "error_file_id",
        "output_file_id",
        "errors",
        "expires_at",
        "completion_window",
        "input_file_id",
        "endpoint",
    ):
        op.drop_column("batches", column)
