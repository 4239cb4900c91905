"""The Python API: enqueue one request, submit a batch, follow and read results.

Everything is committed to Postgres before anything is published to Redis, and
a batch is validated whole first: a bad line means nothing is stored at all.
Handles read Postgres only, so they work from any process.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import update

from jobs import intake
from jobs.batchfile import (
    BatchItem,
    check_batch_stream,
    check_custom_id,
    iter_batch_stream,
    normalize_requests,
    read_batch_stream,
)
from jobs.context import Context, configure, context, publish
from jobs.db import session_scope
from jobs.handles import (
    BatchHandle,
    BatchProgress,
    JobHandle,
    JobResult,
    NotFoundError,
)
from jobs.jsoncheck import json_kind, json_problem, show_value
from jobs.logfmt import log_event
from jobs.models import Job, Priority, Source
from jobs.scheduled import is_file_source, load_callable_requests, run_key
from jobs.settings import MODEL_LIMITS, Settings
from jobs.validation import RequestLimits, ValidationError, check_request

__all__ = [
    "BatchHandle",
    "BatchProgress",
    "Context",
    "JobHandle",
    "JobResult",
    "NotFoundError",
    "configure",
    "context",
    "enqueue",
    "get_batch",
    "get_job",
    "request_limits",
    "submit_batch",
    "submit_file",
    "submit_scheduled",
]

#: Width of the ``batches.name`` column.
MAX_NAME_CHARS = 200


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
        job_id = intake.create_job(session, item, priority=Priority.INTERACTIVE, metadata=metadata)
        if not custom_id:
            session.execute(update(Job).where(Job.id == job_id).values(custom_id=f"job-{job_id}"))
    publish(ctx)
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
        batch_id, created = intake.create_batch(
            session,
            name=name,
            source=source,
            items=items,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
    log_event("batch_submitted", batch=batch_id, jobs=count, source=source.value, created=created)
    if created:
        publish(ctx)
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
