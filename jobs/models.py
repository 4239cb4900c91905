"""Database models: batches, jobs and the attempts ledger.

Postgres is the source of truth for every job. ``attempts`` has one row per
HTTP call and is the usage ledger: its token sum is what the provider reported.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class BatchStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class Source(enum.StrEnum):
    API = "api"
    FILE = "file"
    SCHEDULE = "schedule"


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0
    BULK = 1


def _in(values: type[enum.StrEnum]) -> str:
    return ", ".join(f"'{v.value}'" for v in values)


Timestamp = DateTime(timezone=True)


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(f"source IN ({_in(Source)})", name="source"),
        CheckConstraint(f"status IN ({_in(BatchStatus)})", name="status"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.IN_PROGRESS)
    #: Makes a submission idempotent: a scheduled run uses ``nightly:<date>``.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    queued: Mapped[int] = mapped_column(Integer, default=0)
    running: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", lazy="raise")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_jobs_batch_id_custom_id"),
        CheckConstraint(f"status IN ({_in(JobStatus)})", name="status"),
        # The dispatcher's scan: queued jobs in priority order.
        Index(
            "ix_jobs_dispatch",
            "priority",
            "id",
            postgresql_where=text("status = 'queued'"),
        ),
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        Index("ix_jobs_running_lease", "lease_until", postgresql_where=text("status = 'running'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    batch_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("batches.id", ondelete="CASCADE")
    )
    custom_id: Mapped[str] = mapped_column(String(512))
    priority: Mapped[int] = mapped_column(SmallInteger, default=Priority.BULK)
    model: Mapped[str] = mapped_column(String(200))
    #: The request body; NULL once purged by retention (see ``purged_at``).
    request: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    #: Prompt tokens estimated at submission; the throttle reserves this plus max_tokens.
    est_prompt_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    output_text: Mapped[str | None] = mapped_column(Text)
    reasoning_text: Mapped[str | None] = mapped_column(Text)
    tool_calls: Mapped[list[Any] | None] = mapped_column(JSONB)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    #: When the dispatcher last published the job; NULL = not in Redis.
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: A running job belongs to its worker until then; later, another may take it over.
    lease_until: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: When :mod:`jobs.retention` deleted the request and response bodies; NULL = kept.
    purged_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)

    batch: Mapped[Batch | None] = relationship(back_populates="jobs", lazy="raise")


class Attempt(Base):
    """One HTTP call to the model. Written before the call, completed after it,
    so a call whose worker died mid-flight still leaves a row."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_attempts_job_id_number"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    http_status: Mapped[int | None] = mapped_column(SmallInteger)
    error_kind: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
