"""What the dashboard shows, read from Postgres and Redis: the web process only renders it.

Every read stays cheap however large the batches are: a batch's counts come from its
counter columns (kept by :mod:`jobs.store`), never from counting its jobs, and so does
the backlog, plus the interactive jobs (no batch) through ``ix_jobs_batch_id_status``;
the calls in flight are counted through the partial index on running jobs; a batch's
failed jobs are read through an index too, the first :data:`FAILED_LIST_LIMIT` of them;
the throttle chart reads one hour of the ledger through ``ix_attempts_started_at``.
Times come from the database's clock, so elapsed times agree with the ``*_at`` columns
whatever the web dyno's clock says.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Row, func, select

from jobs import circuit, daily_budget, presence, store
from jobs.attachments import distinct_buckets
from jobs.connections import shared_redis
from jobs.constants import KEY_PREFIX, throttle_pause_key
from jobs.db import session_scope
from jobs.handles import BatchProgress
from jobs.models import Attempt, Batch, BatchMove, Job, JobStatus
from jobs.settings import Settings

#: Batches on the overview, newest first.
BATCH_LIST_LIMIT = 50
#: Failed jobs listed on a batch's page; the page says how many more there are.
FAILED_LIST_LIMIT = 100
#: Minutes of ledger on the throttle chart, the current one included.
CHART_MINUTES = 60


@dataclass(frozen=True)
class BatchSummary(BatchProgress):
    """A batch as the overview (and ``python -m jobs list``) lists it: its progress, and when."""

    created_at: dt.datetime
    finished_at: dt.datetime | None
    #: From ``created_at`` to ``finished_at``, or to now while it has not ended.
    elapsed_s: float
    #: Why its calls are paused (its budget ran out), or ``None``.
    paused_reason: str | None = None


@dataclass(frozen=True)
class FailedJob:
    id: int
    custom_id: str
    error_code: str | None
    last_error: str | None
    #: The provider's HTTP status that failed the job for good (a 4xx), if any.
    error_status: int | None
    attempts: int
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class BatchDetail:
    """A batch's page: its summary, timestamps, files and what went wrong."""

    summary: BatchSummary
    source: str
    endpoint: str
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    completion_window: str | None
    #: OpenAI's ``*_at`` stamps, in the order a batch moves through them (unset ones left out).
    timestamps: list[tuple[str, dt.datetime]]
    #: Why validation failed: ``[{"code", "line", "message", "param"}, ...]``.
    validation_errors: list[dict[str, Any]]
    #: The first :data:`FAILED_LIST_LIMIT` failed jobs by id; ``summary.failed`` counts all.
    failed_jobs: list[FailedJob]


@dataclass(frozen=True)
class MinuteUsage:
    """The calls the ledger saw start within one minute, and the tokens they used."""

    start: dt.datetime
    requests: int
    #: Prompt plus completion tokens; a call still in flight counts 0 until answered.
    tokens: int


@dataclass(frozen=True)
class LiveState:
    """The queue and the throttle right now."""

    #: Jobs waiting to run (queued): every batch's (its counter) and the interactive ones.
    backlog: int
    #: Jobs a worker holds: in flight, waiting for a throttle slot or a backoff.
    running: int
    #: Jobs with a call on the wire (``jobs.calling``).
    in_flight: int
    #: Seconds the bucket still admits nothing after a provider 429; ``None``: no pause.
    #: Both are ``None`` with ``redis_error`` set when Redis could not be read.
    paused_for_s: float | None
    #: Why calls are paused for the key (an open circuit, a spent daily budget); ``None``
    #: when they flow.
    circuit: str | None
    #: Worker processes alive (:mod:`jobs.presence`); ``None`` if Redis could not be read.
    workers: int | None
    redis_error: str | None


_SUMMARY_COLUMNS = (
    Batch.id,
    Batch.name,
    Batch.source,
    Batch.status,
    Batch.total,
    *(store.live_count(name).label(name) for name in store.COUNTERS),
    Batch.created_at,
    Batch.finished_at,
    Batch.paused_reason,
    func.extract("epoch", func.coalesce(Batch.finished_at, func.now()) - Batch.created_at).label(
        "elapsed_s"
    ),
)


def _summary(row: Row[*tuple[Any, ...]]) -> BatchSummary:
    return BatchSummary(
        id=row.id,
        name=row.name,
        source=row.source,
        status=row.status,
        total=row.total,
        queued=row.queued,
        running=row.running,
        succeeded=row.succeeded,
        failed=row.failed,
        cancelled=row.cancelled,
        created_at=row.created_at,
        finished_at=row.finished_at,
        elapsed_s=max(0.0, float(row.elapsed_s)),
        paused_reason=row.paused_reason,
    )


def recent_batches(database_url: str, *, limit: int = BATCH_LIST_LIMIT) -> list[BatchSummary]:
    """The newest batches first (ids grow with time), from their counters."""
    with session_scope(database_url) as session:
        rows = session.execute(select(*_SUMMARY_COLUMNS).order_by(Batch.id.desc()).limit(limit))
        return [_summary(row) for row in rows]


#: The stamps a batch page lists, in lifecycle order.
_STAMPS = (
    "created_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "expires_at",
    "finished_at",
)


def batch_detail(database_url: str, batch_id: int) -> BatchDetail | None:
    """One batch's page, or ``None`` if there is no such batch."""
    with session_scope(database_url) as session:
        row = session.execute(select(*_SUMMARY_COLUMNS).where(Batch.id == batch_id)).one_or_none()
        batch = session.get(Batch, batch_id)
        if row is None or batch is None:
            return None
        failed = session.execute(
            select(
                Job.id,
                Job.custom_id,
                Job.error_code,
                Job.last_error,
                Job.error_status,
                Job.attempts,
                Job.finished_at,
            )
            .where(Job.batch_id == batch_id, Job.status == JobStatus.FAILED)
            .order_by(Job.id)
            .limit(FAILED_LIST_LIMIT)
        )
        failed_jobs = [FailedJob(*r) for r in failed]
    stamps = [(name, getattr(batch, name)) for name in _STAMPS]
    return BatchDetail(
        summary=_summary(row),
        source=batch.source,
        endpoint=batch.endpoint,
        input_file_id=batch.input_file_id,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        completion_window=batch.completion_window,
        timestamps=[(name, moment) for name, moment in stamps if moment is not None],
        validation_errors=list(batch.errors or []),
        failed_jobs=failed_jobs,
    )


def throttle_minutes(database_url: str, *, minutes: int = CHART_MINUTES) -> list[MinuteUsage]:
    """Calls and tokens per minute over the last ``minutes`` (oldest first, none skipped).

    Every call counts, a 429 included: the chart shows what we sent, against the limits.
    """
    # A UTC minute, whatever the session's time zone (a half-hour zone would shift it).
    minute = func.date_trunc("minute", func.timezone("UTC", Attempt.started_at))
    first = func.date_trunc("minute", func.timezone("UTC", func.now())) - dt.timedelta(
        minutes=minutes - 1
    )
    with session_scope(database_url) as session:
        start = session.execute(select(first)).scalar_one()
        rows = session.execute(
            select(
                minute.label("minute"),
                func.count(),
                func.coalesce(func.sum(Attempt.prompt_tokens + Attempt.completion_tokens), 0),
            )
            .where(Attempt.started_at >= func.timezone("UTC", start))
            .group_by(minute)
        ).all()
    found = {m: (int(n), int(tokens)) for m, n, tokens in rows}
    buckets = []
    for i in range(minutes):
        moment = start + dt.timedelta(minutes=i)
        requests, tokens = found.get(moment, (0, 0))
        buckets.append(MinuteUsage(moment.replace(tzinfo=dt.UTC), requests, tokens))
    return buckets


def live_state(settings: Settings) -> LiveState:
    """The backlog and the calls in flight (Postgres), the pause and circuit (Redis)."""
    assert settings.database_url is not None
    with session_scope(settings.database_url) as session:
        # The batches' counters and their moves not yet folded, plus the interactive jobs
        # (no batch) by their index:
        # counting queued jobs row by row would read a large backlog on every refresh.
        in_batches = (
            select(func.coalesce(func.sum(Batch.queued), 0)).scalar_subquery()
            + select(func.coalesce(func.sum(BatchMove.queued), 0)).scalar_subquery()
        )
        alone = (
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id.is_(None), Job.status == JobStatus.QUEUED)
            .scalar_subquery()
        )
        backlog = int(session.execute(select(in_batches + alone)).scalar_one())
        running, in_flight = session.execute(
            select(func.count(), func.count().filter(Job.calling.is_(True)))
            .select_from(Job)
            # `calling` is only ever set on a running job: the running index finds them all.
            .where(Job.status == JobStatus.RUNNING)
        ).one()
    try:
        client = shared_redis(_redis_url(settings))
        paused = pause_remaining_s(client, settings)
        reason = (
            circuit.paused_reason(settings)
            or daily_budget.pause_reason(settings)
            or circuit.set_aside(settings)
        )
        workers = presence.live_workers(client)
    except redis.RedisError as exc:
        return LiveState(backlog, running, in_flight, None, None, None, _one_line(exc))
    return LiveState(backlog, running, in_flight, paused, reason, workers, None)


def _redis_url(settings: Settings) -> str:
    assert settings.redis_url is not None
    return settings.redis_url


def pause_remaining_s(client: redis.Redis, settings: Settings) -> float | None:
    """Seconds left of the longest bucket's pause (a provider 429) of the pool, by Redis's
    clock; ``None``: none.

    Without INFERENCE_KEY in this process (a web dyno may not have it), any paused bucket
    of the model is reported, as :func:`jobs.circuit.paused_reason` does for circuits.
    """
    if settings.inference_key:
        keys = [throttle_pause_key(a.bucket_name) for a in distinct_buckets(settings.attachments)]
    else:
        pattern = f"{KEY_PREFIX}throttle:{{{settings.model_id}:*}}:pause"
        keys = [k.decode() for k in client.scan_iter(match=pattern, count=100)]
    if not keys:
        return None
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for key in keys:
            pipe.get(key)
        (now_s, now_us), *values = pipe.execute()
    now_ms = now_s * 1000 + now_us // 1000
    left = max((int(v) - now_ms for v in values if v is not None), default=0)
    return left / 1000 if left > 0 else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
