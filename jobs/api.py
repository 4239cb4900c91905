"""The Python API: enqueue one request, submit a batch, follow and read results.

Everything is committed to Postgres before anything is published to Redis, and
a batch is validated whole first: a bad line means nothing is stored at all.
Handles read Postgres only, so they work from any process.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import select, update

from jobs import store
from jobs.batchfile import (
    BatchItem,
    check_batch_stream,
    check_custom_id,
    iter_batch_stream,
    normalize_requests,
    output_line,
    read_batch_stream,
)
from jobs.circuit import paused_reason
from jobs.connections import celery_app
from jobs.db import session_scope
from jobs.dispatch import dispatch
from jobs.jsoncheck import json_kind, json_problem, show_value
from jobs.logfmt import log_event
from jobs.models import TERMINAL, Batch, Job, JobStatus, Priority, Source
from jobs.scheduled import is_file_source, load_callable_requests, run_key
from jobs.services import resolve
from jobs.settings import MODEL_LIMITS, Settings
from jobs.validation import RequestLimits, ValidationError, check_request

#: Width of the ``batches.name`` column.
MAX_NAME_CHARS = 200


class NotFoundError(LookupError):
    """No batch or job has that id."""


# Ids are Postgres bigints; a larger number would make the query itself fail.
_MAX_ID = 2**63 - 1


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_ID


@dataclass(frozen=True)
class Context:
    """Resolved settings plus the Celery app used to publish."""

    settings: Settings
    app: Celery

    @property
    def database_url(self) -> str:
        assert self.settings.database_url is not None
        return self.settings.database_url


_contexts: dict[Settings | None, Context] = {}
_context_lock = threading.Lock()


def context(settings: Settings | None = None) -> Context:
    """The context for ``settings`` (default: the environment), built once per process."""
    with _context_lock:
        ctx = _contexts.get(settings)
        if ctx is None:
            resolved = resolve(settings if settings is not None else Settings.from_env())
            ctx = _contexts[settings] = Context(resolved, celery_app(resolved))
        return ctx


def request_limits(settings: Settings) -> RequestLimits:
    return RequestLimits(
        context_tokens=settings.context_tokens,
        tpm=settings.tpm,
        default_max_tokens=settings.default_max_tokens,
        known_models=frozenset(MODEL_LIMITS) | {settings.model_id},
    )


def _check_name(name: object) -> None:
    """Refuse a batch name the ``batches.name`` column cannot hold."""
    if not isinstance(name, str) or not name:
        raise ValidationError(f"must be a non-empty string, got {show_value(name)}", field="name")
    if len(name) > MAX_NAME_CHARS:
        raise ValidationError(
            f"is {len(name)} characters long (at most {MAX_NAME_CHARS})", field="name"
        )
    problem = json_problem({"name": name}, "")
    if problem is not None:  # a NUL character or a lone surrogate
        raise ValidationError(problem.reason, field=problem.field)


def _check_metadata(metadata: object) -> None:
    """Refuse job or batch metadata that a JSONB column cannot hold, naming the field."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ValidationError(f"must be a JSON object, got {json_kind(metadata)}", field="metadata")
    problem = json_problem(metadata, "metadata")
    if problem is not None:
        raise ValidationError(problem.reason, field=problem.field)


def _publish(ctx: Context) -> None:
    # The jobs are committed; if Redis is away, a worker's dispatcher publishes them later.
    try:
        dispatch(ctx.settings, ctx.app)
    except Exception as exc:  # noqa: BLE001 - publishing is best effort here
        log_event("publish_deferred", error=type(exc).__name__)


@dataclass(frozen=True)
class JobResult:
    """What one job produced.

    Once retention has purged the job (``purged_at`` set), ``output_text``,
    ``reasoning_text``, ``tool_calls`` and ``response`` are ``None``; the status,
    token counts and error stay.
    """

    id: int
    custom_id: str
    status: str
    output_text: str | None
    reasoning_text: str | None
    tool_calls: list[Any] | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    attempts: int
    error_code: str | None
    error: str | None
    response: dict[str, Any] | None
    #: When retention deleted the bodies; ``None`` while they are kept.
    purged_at: dt.datetime | None = None

    @property
    def purged(self) -> bool:
        return self.purged_at is not None


@dataclass(frozen=True)
class BatchProgress:
    """Counts of a batch's jobs by status."""

    id: int
    name: str
    source: str
    status: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def finished(self) -> bool:
        return self.status != "in_progress"


class JobHandle:
    """A job stored in Postgres."""

    def __init__(self, job_id: int, ctx: Context) -> None:
        self.id = job_id
        self._ctx = ctx

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id})"

    def _load(self) -> Job:
        if not _is_id(self.id):
            raise NotFoundError(f"job {self.id} does not exist")
        with session_scope(self._ctx.database_url) as session:
            job = session.get(Job, self.id)
            if job is None:
                raise NotFoundError(f"job {self.id} does not exist")
            return job

    def status(self) -> str:
        return self._load().status

    def wait(self, timeout: float | None = None, *, poll: float = 0.25) -> str:
        """Block until the job is finished; returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {status} after {timeout} s")
            time.sleep(poll)

    def result(self) -> JobResult:
        job = self._load()
        return JobResult(
            id=job.id,
            custom_id=job.custom_id,
            status=job.status,
            output_text=job.output_text,
            reasoning_text=job.reasoning_text,
            tool_calls=job.tool_calls,
            finish_reason=job.finish_reason,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            total_tokens=job.total_tokens,
            attempts=job.attempts,
            error_code=job.error_code,
            error=job.last_error,
            response=job.response,
            purged_at=job.purged_at,
        )


class BatchHandle:
    """A batch stored in Postgres."""

    def __init__(self, batch_id: int, ctx: Context, *, created: bool = True) -> None:
        self.id = batch_id
        self.created = created
        self._ctx = ctx

    def __repr__(self) -> str:
        return f"BatchHandle(id={self.id})"

    def progress(self) -> BatchProgress:
        if not _is_id(self.id):
            raise NotFoundError(f"batch {self.id} does not exist")
        with session_scope(self._ctx.database_url) as session:
            batch = session.get(Batch, self.id)
            if batch is None:
                raise NotFoundError(f"batch {self.id} does not exist")
            return BatchProgress(
                id=batch.id,
                name=batch.name,
                source=batch.source,
                status=batch.status,
                total=batch.total,
                queued=batch.queued,
                running=batch.running,
                succeeded=batch.succeeded,
                failed=batch.failed,
                cancelled=batch.cancelled,
            )

    def calls_paused(self) -> str | None:
        """Why no call is being made for any job (the provider rejects the key), or ``None``."""
        return paused_reason(self._ctx.settings)

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.5,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ) -> BatchProgress:
        """Block until no job of the batch is queued or running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            progress = self.progress()
            if on_progress is not None:
                on_progress(progress)
            if progress.finished and progress.running == 0:
                return progress
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {self.id} not finished after {timeout} s")
            time.sleep(poll)

    def results(self) -> Iterator[dict[str, Any]]:
        """OpenAI Batch output lines for the finished jobs, in submission order."""
        self.progress()  # raises NotFoundError for an unknown id
        last_id = 0
        while True:
            with session_scope(self._ctx.database_url) as session:
                jobs = (
                    session.execute(
                        select(Job)
                        .where(Job.batch_id == self.id, Job.id > last_id, Job.status.in_(TERMINAL))
                        .order_by(Job.id)
                        .limit(1000)
                    )
                    .scalars()
                    .all()
                )
            if not jobs:
                return
            for job in jobs:
                yield job_output_line(job)
            last_id = jobs[-1].id

    def cancel(self) -> int:
        """Cancel queued jobs; returns how many. Running ones finish and are recorded."""
        self.progress()
        with session_scope(self._ctx.database_url) as session:
            return store.cancel_batch(session, self.id)

    def retry(self) -> int:
        """Re-queue the failed jobs; returns how many."""
        self.progress()
        with session_scope(self._ctx.database_url) as session:
            count = store.retry_batch(session, self.id)
        if count:
            _publish(self._ctx)
        return count


#: Error code of the output line of a succeeded job whose response body retention deleted.
PURGED_CODE = "purged"


def job_output_line(job: Job) -> dict[str, Any]:
    """The OpenAI Batch output line of a finished job.

    A succeeded job purged by retention keeps its ``status_code`` 200, has a null
    body and an error ``purged`` saying when; a purged failed or cancelled job
    reads as before, since its line never carried a body.
    """
    succeeded = job.status == JobStatus.SUCCEEDED
    if succeeded and job.purged_at is not None:
        return output_line(
            job_id=f"job-{job.id}",
            custom_id=job.custom_id,
            status_code=200,
            response_body=None,
            request_id=None,
            error_code=PURGED_CODE,
            error_message=(
                f"response body deleted by data retention at {job.purged_at.isoformat()}"
            ),
        )
    return output_line(
        job_id=f"job-{job.id}",
        custom_id=job.custom_id,
        status_code=200 if succeeded else None,
        response_body=job.response if succeeded else None,
        request_id=str((job.response or {}).get("id")) if succeeded else None,
        error_code=None if succeeded else (job.error_code or job.status),
        error_message=None if succeeded else (job.last_error or f"job {job.status}"),
    )


def enqueue(
    messages: list[dict[str, Any]],
    *,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    custom_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    settings: Settings | None = None,
    **fields: Any,
) -> JobHandle:
    """Queue one interactive chat completion; it runs ahead of bulk batches.

    Any other chat-completion field (``top_p``, ``stop``, ``extended_thinking``…)
    passes through unchanged in ``fields``.
    """
    ctx = context(settings)
    _check_metadata(metadata)
    if custom_id is not None:
        check_custom_id(custom_id)
    body: dict[str, Any] = {"model": model or ctx.settings.model_id, "messages": messages}
    optional = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "tools": tools,
        "tool_choice": tool_choice,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    body.update(fields)
    checked = check_request(body, request_limits(ctx.settings))
    item = BatchItem(line=1, custom_id=custom_id or "", request=checked)
    with session_scope(ctx.database_url) as session:
        job_id = store.create_job(session, item, priority=Priority.INTERACTIVE, metadata=metadata)
        if not custom_id:
            session.execute(update(Job).where(Job.id == job_id).values(custom_id=f"job-{job_id}"))
    _publish(ctx)
    return JobHandle(job_id, ctx)


def _store_batch(
    ctx: Context,
    items: Iterable[BatchItem],
    *,
    count: int,
    name: str,
    source: Source,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
) -> BatchHandle:
    with session_scope(ctx.database_url) as session:
        batch_id, created = store.create_batch(
            session,
            name=name,
            source=source,
            items=items,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
    log_event("batch_submitted", batch=batch_id, jobs=count, source=source.value, created=created)
    if created:
        _publish(ctx)
    return BatchHandle(batch_id, ctx, created=created)


def submit_batch(
    requests: Iterable[object],
    *,
    name: str = "batch",
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    source: Source = Source.API,
    settings: Settings | None = None,
) -> BatchHandle:
    """Validate every request, then store and queue them as one batch.

    ``requests`` may mix plain request bodies and OpenAI Batch input lines.
    Raises :class:`~jobs.validation.ValidationError` naming each bad request;
    nothing is stored then.
    """
    ctx = context(settings)
    _check_name(name)
    _check_metadata(metadata)
    items = normalize_requests(
        requests, request_limits(ctx.settings), default_model=ctx.settings.model_id
    )
    return _store_batch(
        ctx,
        items,
        count=len(items),
        name=name,
        source=source,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )


def submit_file(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    source: Source = Source.FILE,
    settings: Settings | None = None,
) -> BatchHandle:
    """Validate an OpenAI Batch JSONL file whole, then store and queue it.

    The file is read twice: once to validate every line (keeping only the custom_ids),
    then again to stream its requests into one transaction (one COPY), so memory stays
    bounded whatever the file's size. A stream that cannot be read twice (a pipe)
    is validated and held in memory in one pass instead.
    """
    ctx = context(settings)
    name = Path(path).name[:MAX_NAME_CHARS] if name is None else name
    _check_name(name)
    _check_metadata(metadata)
    limits = request_limits(ctx.settings)
    with open(path, "rb") as stream:
        items: Iterable[BatchItem]
        if stream.seekable():
            count = check_batch_stream(stream, limits)
            stream.seek(0)
            items = iter_batch_stream(stream, limits)
        else:
            items = read_batch_stream(stream, limits)
            count = len(items)
        return _store_batch(
            ctx,
            items,
            count=count,
            name=name,
            source=source,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )


def get_batch(batch_id: int, *, settings: Settings | None = None) -> BatchHandle:
    handle = BatchHandle(batch_id, context(settings))
    handle.progress()
    return handle


def get_job(job_id: int, *, settings: Settings | None = None) -> JobHandle:
    handle = JobHandle(job_id, context(settings))
    handle.status()
    return handle


def submit_scheduled(
    source: str,
    *,
    name: str,
    cron: str,
    now: dt.datetime | None = None,
    settings: Settings | None = None,
) -> BatchHandle:
    """Create the batch of one scheduled run, once per cron slot.

    ``source`` is a JSONL path or ``module:callable``; the batch's source is
    ``schedule`` and its idempotency key names the slot, so a second firing of
    the same slot returns the existing batch (``created=False``).
    """
    key = run_key(name, cron, now or dt.datetime.now(dt.UTC))
    label = f"{name} {key.rsplit(':', 2)[-2]}:{key.rsplit(':', 1)[-1]}"
    if is_file_source(source):
        return submit_file(
            source, name=label, idempotency_key=key, source=Source.SCHEDULE, settings=settings
        )
    return submit_batch(
        load_callable_requests(source),
        name=label,
        idempotency_key=key,
        source=Source.SCHEDULE,
        settings=settings,
    )
