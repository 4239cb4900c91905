"""The Python API: enqueue one request, submit a batch, follow and read results.

Everything is committed to Postgres before anything is published to Redis, and
a batch is validated whole first: a bad line means nothing is stored at all.
Handles read Postgres only, so they work from any process.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import update

from jobs import daily_budget, dashboard_data, dryrun, files, housekeeping, intake
from jobs.batchfile import (
    BatchItem,
    check_batch_stream,
    check_custom_id,
    iter_batch_stream,
    normalize_requests,
    read_batch_stream,
)
from jobs.budget import Budget, check_items, worst_case
from jobs.constants import TASK_VALIDATE_BATCH
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
from jobs.models import FilePurpose, Job, Priority, Source
from jobs.scheduled import is_file_source, load_callable_requests, run_key
from jobs.settings import Settings
from jobs.validation import RequestLimits, ValidationError, check_request, request_limits

__all__ = [
    "BatchHandle",
    "BatchProgress",
    "Context",
    "JobHandle",
    "JobResult",
    "NotFoundError",
    "configure",
    "context",
    "create_file_batch",
    "enqueue",
    "get_batch",
    "get_job",
    "recent_batches",
    "request_limits",
    "submit_batch",
    "submit_file",
    "submit_scheduled",
]

#: Width of the ``batches.name`` column.
MAX_NAME_CHARS = 200


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

    Raises :class:`~jobs.daily_budget.DailyBudgetError` at once while the day's budget
    is spent (DAILY_BUDGET_TOKENS / DAILY_BUDGET_USD), or if the request alone could
    take more than a day's.

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
    max_out = checked.max_tokens or ctx.settings.default_max_tokens
    call = worst_case(checked.model, checked.est_prompt_tokens, max_out, ctx.settings.price_for)
    daily_budget.refuse(ctx.settings, call)
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
    completion_window: str | None,
    budget: Budget | None,
) -> BatchHandle:
    window_s = window_seconds(completion_window) if completion_window is not None else None
    with session_scope(ctx.database_url) as session:
        batch_id, created = intake.create_batch(
            session,
            name=name,
            source=source,
            items=items,
            metadata=metadata,
            idempotency_key=idempotency_key,
            notify=ctx.settings.webhook_url is not None,
            completion_window=completion_window,
            window_s=window_s,
            budget=budget,
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
    completion_window: str | None = None,
    budget: Budget | None = None,
    settings: Settings | None = None,
) -> BatchHandle:
    """Validate every request, then store and queue them as one batch.

    ``requests`` may mix plain request bodies and OpenAI Batch input lines. With a
    ``completion_window`` (``24h``, ``30m``…) the batch expires if it has not ended
    within it; by default it has none. With a ``budget`` (:class:`jobs.budget.Budget`)
    no call starts that could take the batch past it; a request that alone could
    is a validation error.
    Raises :class:`~jobs.validation.ValidationError` naming each bad request;
    nothing is stored then.
    """
    ctx = context(settings)
    _check_name(name)
    _check_metadata(metadata)
    items = normalize_requests(
        requests, request_limits(ctx.settings), default_model=ctx.settings.model_id
    )
    if budget:
        items = list(_within(items, budget, ctx.settings, label="request"))
    return _store_batch(
        ctx,
        items,
        count=len(items),
        name=name,
        source=source,
        metadata=metadata,
        idempotency_key=idempotency_key,
        completion_window=completion_window,
        budget=budget,
    )


def submit_file(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    source: Source = Source.FILE,
    completion_window: str | None = None,
    budget: Budget | None = None,
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
        count, items = _checked_items(stream, limits)
        if budget:
            # Checked as the rows stream in: a line that fails rolls the whole batch back.
            items = _within(items, budget, ctx.settings, label="line")
        return _store_batch(
            ctx,
            items,
            count=count,
            name=name,
            source=source,
            metadata=metadata,
            idempotency_key=idempotency_key,
            completion_window=completion_window,
            budget=budget,
        )


def _within(
    items: Iterable[BatchItem], budget: Budget, settings: Settings, *, label: str
) -> Iterator[BatchItem]:
    """``items``, each checked to fit ``budget`` alone, a failure named by its ``label``."""
    try:
        yield from check_items(items, budget, settings.default_max_tokens, settings.price_for)
    except ValidationError as exc:
        raise (exc.at(exc.line, label) if exc.line is not None else exc) from None


def estimate_file(
    path: str | os.PathLike[str], *, settings: Settings | None = None
) -> dryrun.Estimate:
    """A dry run of a batch file (:mod:`jobs.dryrun`): validated whole like
    :func:`submit_file`, nothing stored and nothing sent. Raises what it raises."""
    ctx = context(settings)
    limits = request_limits(ctx.settings)
    with open(path, "rb") as stream:
        return dryrun.estimate(_checked_items(stream, limits)[1], ctx.settings)


def _checked_items(stream: BinaryIO, limits: RequestLimits) -> tuple[int, Iterable[BatchItem]]:
    """A batch file validated whole, then its items: read again from the start where the
    stream can seek (memory stays bounded), else held from the one pass a pipe allows."""
    if stream.seekable():
        count = check_batch_stream(stream, limits)
        stream.seek(0)
        return count, iter_batch_stream(stream, limits)
    items = read_batch_stream(stream, limits)
    return len(items), items


def estimate_batch(
    requests: Iterable[object], *, settings: Settings | None = None
) -> dryrun.Estimate:
    """A dry run of the requests :func:`submit_batch` would take; nothing stored."""
    ctx = context(settings)
    items = normalize_requests(
        requests, request_limits(ctx.settings), default_model=ctx.settings.model_id
    )
    return dryrun.estimate(items, ctx.settings)


def get_batch(batch_id: int, *, settings: Settings | None = None) -> BatchHandle:
    handle = BatchHandle(batch_id, context(settings))
    handle.progress()
    return handle


def recent_batches(*, limit: int = 20, settings: Settings | None = None) -> list[BatchProgress]:
    """The ``limit`` newest batches' progress, newest first (with their times)."""
    return list(dashboard_data.recent_batches(context(settings).database_url, limit=limit))


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


#: ``completion_window``: a number and a unit, as OpenAI's ``24h``.
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: OpenAI's limits on batch metadata.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def window_seconds(window: object) -> float:
    """Seconds of a ``completion_window`` (``24h``, ``30m``, ``45s``), or ValidationError."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None:
        raise ValidationError(
            "must be a duration such as '24h' (a number and s, m, h or d), "
            f"got {show_value(window)}",
            field="completion_window",
        )
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def check_batch_metadata(metadata: object) -> dict[str, str]:
    """OpenAI's batch metadata: at most 16 string pairs (keys 64, values 512 characters)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValidationError(f"must be a JSON object, got {json_kind(metadata)}", field="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValidationError(
            f"has {len(metadata)} pairs (at most {MAX_METADATA_PAIRS})", field="metadata"
        )
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_METADATA_KEY:
            raise ValidationError(
                f"keys are strings of at most {MAX_METADATA_KEY} characters and values strings",
                field=f"metadata.{key}",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise ValidationError(
                f"is {len(value)} characters long (at most {MAX_METADATA_VALUE})",
                field=f"metadata.{key}",
            )
    _check_metadata(metadata)
    return metadata


def create_file_batch(
    input_file_id: str,
    *,
    endpoint: str,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    settings: Settings | None = None,
) -> BatchHandle:
    """Create a batch from an uploaded file, as ``POST /v1/batches`` does.

    It returns at once, ``validating``: a worker validates the file in the background
    (:mod:`jobs.validating`) and starts the batch, or fails it with the file's errors.
    A wrong ``endpoint`` fails it the same way. ``metadata`` may carry ``budget_tokens``
    and ``budget_usd`` (:class:`jobs.budget.Budget`). Raises :class:`NotFoundError` for an
    unknown file and :class:`~jobs.validation.ValidationError` for a bad argument.
    """
    ctx = context(settings)
    window_s = window_seconds(completion_window)
    checked = check_batch_metadata(metadata)
    budget = Budget.parse(
        checked.get("budget_tokens"),
        checked.get("budget_usd"),
        names=("metadata.budget_tokens", "metadata.budget_usd"),
    )
    file = files.get(ctx.database_url, input_file_id) if isinstance(input_file_id, str) else None
    if file is None:
        raise NotFoundError(f"file {input_file_id} does not exist")
    if file.purpose != FilePurpose.BATCH:
        raise ValidationError(
            f"file {input_file_id} has purpose {file.purpose!r}, not 'batch'",
            field="input_file_id",
        )
    with session_scope(ctx.database_url) as session:
        batch_id = intake.create_pending_batch(
            session,
            name=file.filename[:MAX_NAME_CHARS],
            input_file_id=file.id,
            endpoint=endpoint,
            completion_window=completion_window,
            window_s=window_s,
            metadata=checked,
            budget=budget,
        )
    try:
        housekeeping.publish_once(ctx.settings, ctx.app, TASK_VALIDATE_BATCH, batch_id)
    except Exception as exc:  # noqa: BLE001 - the sweep publishes it again after a minute
        log_event("publish_deferred", batch=batch_id, error=type(exc).__name__)
    log_event("batch_created", batch=batch_id, file=file.id, status="validating")
    return BatchHandle(batch_id, ctx)
