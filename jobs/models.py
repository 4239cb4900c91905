"""Database models: batches, jobs, the attempts ledger, files and webhook events.

Postgres is the source of truth for every job. ``attempts`` has one row per
HTTP call and is the usage ledger: its token sum is what the provider reported.
``files`` holds what the Files API serves: uploaded batch inputs (their bytes in
``file_chunks``) and each batch's output and error files, rendered from its jobs.
``webhook_events`` is the outbox of the events sent when a batch ends.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
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
    """OpenAI's batch statuses; :mod:`jobs.store` draws how a batch moves between them."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: A batch in one of these has ended: nothing of it runs or will run.
BATCH_ENDED = (
    BatchStatus.FAILED,
    BatchStatus.COMPLETED,
    BatchStatus.EXPIRED,
    BatchStatus.CANCELLED,
)
#: The only endpoint a batch may name.
CHAT_ENDPOINT = "/v1/chat/completions"


class FilePurpose(enum.StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class FileRole(enum.StrEnum):
    """Where a file's content comes from."""

    #: Uploaded: its bytes are in ``file_chunks``.
    INPUT = "input"
    #: A batch's succeeded requests, rendered from its jobs when downloaded.
    OUTPUT = "output"
    #: A batch's failed, cancelled and expired requests, rendered likewise.
    ERROR = "error"


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
    endpoint: Mapped[str] = mapped_column(
        String(64), default=CHAT_ENDPOINT, server_default=CHAT_ENDPOINT
    )
    #: The uploaded file a Batches API batch was created from (``file-…``).
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    #: ``24h`` and the like; NULL: no window (the CLI's and nightly batches by default).
    completion_window: Mapped[str | None] = mapped_column(String(16))
    #: When the window closes: the batch expires if it has not ended by then.
    expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: Why validation failed: ``[{"code", "line", "message", "param"}, ...]``.
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    #: When each status was reached (OpenAI's ``*_at``).
    in_progress_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    finalizing_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    completed_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    failed_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    expired_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: What the batch may spend (:mod:`jobs.budget`); NULL: no limit of that kind.
    budget_tokens: Mapped[int | None] = mapped_column(BigInteger)
    budget_usd: Mapped[float | None] = mapped_column(Float)
    #: Why the batch's calls are paused (its budget ran out); NULL: not paused. A paused
    #: batch stays ``in_progress``, with its remaining jobs queued.
    paused_reason: Mapped[str | None] = mapped_column(Text)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", lazy="raise")


class BatchMove(Base):
    """Jobs of a batch that moved between its counters, not yet added to the batch's row.

    Every job moves twice or more (claimed, then ended), and updating the batch row
    each time made every job of a batch queue on that row's lock: a move is an insert
    instead, and the dispatcher's sweep folds the moves into the row
    (:func:`jobs.store.fold_moves`). No foreign key: its check would lock the batch row.
    """

    __tablename__ = "batch_moves"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    batch_id: Mapped[int] = mapped_column(BigInteger, index=True)
    queued: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    running: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    succeeded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


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
    #: A call of this job is on the wire: a cancel lets it finish instead of stopping it.
    calling: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    #: The provider's HTTP answer that failed the job for good (a 4xx), if there was one.
    error_status: Mapped[int | None] = mapped_column(SmallInteger)
    request_id: Mapped[str | None] = mapped_column(String(200))
    error_body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    batch: Mapped[Batch | None] = relationship(back_populates="jobs", lazy="raise")


class Attempt(Base):
    """One HTTP call to the model. Written before the call, completed after it,
    so a call whose worker died mid-flight still leaves a row."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_attempts_job_id_number"),
        # The calibration's read: the last answered calls of one model and script.
        Index(
            "ix_attempts_calibration",
            "model",
            "script",
            "id",
            postgresql_where=text("est_prompt_tokens IS NOT NULL"),
        ),
        # The completion share's read: the last answered calls of one model.
        Index(
            "ix_attempts_completion_share",
            "model",
            "id",
            postgresql_where=text("max_tokens IS NOT NULL"),
        ),
    )

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
    #: The raw prompt estimate the call was priced from, and the prompt's dominant
    #: script (``latin``, ``cjk``): with ``prompt_tokens`` they are the calibration's
    #: samples (:mod:`jobs.calibration`).
    est_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    script: Mapped[str | None] = mapped_column(String(8))
    #: The completion budget the call was sent with: with ``completion_tokens``, the
    #: samples of the share of it that answers use (:mod:`jobs.calibration`).
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    #: The most prompt tokens the call was expected to cost (the larger of the raw and
    #: the calibrated estimate): with ``max_tokens``, its worst case while unanswered.
    worst_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    #: The attachment the call went through (:mod:`jobs.attachments`): its alias, and
    #: its key's hash (never the key). ``NULL`` on calls made before the pool existed.
    attachment: Mapped[str | None] = mapped_column(String(64))
    key_hash: Mapped[str | None] = mapped_column(String(12))


class File(Base):
    """A file of the Files API: an uploaded batch input, or a batch's output or errors."""

    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint(f"purpose IN ({_in(FilePurpose)})", name="purpose"),
        CheckConstraint(f"role IN ({_in(FileRole)})", name="role"),
        Index("ix_files_created_at", "created_at"),
    )

    #: ``file-`` and 24 hex digits.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(8))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    #: The batch an output or error file belongs to.
    batch_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("batches.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


class FileChunk(Base):
    """One piece of an uploaded file's bytes, in order."""

    __tablename__ = "file_chunks"
    __table_args__ = (PrimaryKeyConstraint("file_id", "seq"),)

    file_id: Mapped[str] = mapped_column(String(64), ForeignKey("files.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class WebhookEvent(Base):
    """An event to deliver to WEBHOOK_URL, kept until delivered (and after, as a record)."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index(
            "ix_webhook_events_due",
            "next_attempt_at",
            postgresql_where=text("delivered_at IS NULL"),
        ),
    )

    #: ``evt_`` and 24 hex digits: the event's id and its ``webhook-id`` header.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    batch_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("batches.id", ondelete="SET NULL")
    )
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    delivered_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    #: The receiver's last answer (HTTP status) or why there was none.
    last_status: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
