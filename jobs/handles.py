"""Handles on stored jobs and batches: progress, waiting, results, cancel and retry.

Handles read Postgres only, so they work from any process; waiting rides out outages
and says when no worker runs (:mod:`jobs.waiting`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select

from jobs import daily_budget, finalizing, outputs, store
from jobs.budget import Budget, Standing, standing
from jobs.circuit import paused_reason, set_aside
from jobs.context import Context, publish
from jobs.db import session_scope
from jobs.logfmt import log_event
from jobs.models import BATCH_ENDED, TERMINAL, Batch, FileRole, Job
from jobs.validation import ValidationError
from jobs.waiting import Watch

#: Which output lines :meth:`BatchHandle.results` gives.
Which = Literal["output", "errors", "all"]


class NotFoundError(LookupError):
    """No batch or job has that id."""


# Ids are Postgres bigints; a larger number would make the query itself fail.
_MAX_ID = 2**63 - 1


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_ID


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
        """The batch has ended (completed, failed, expired or cancelled)."""
        return self.status in BATCH_ENDED


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

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.25,
        on_notice: Callable[[str], None] | None = None,
    ) -> str:
        """Block until the job is finished; returns its status.

        Rides out a Postgres or Redis outage and says once, through ``on_notice`` (default:
        a warning on the ``batch_infer`` logger), that no worker is running; see
        :mod:`jobs.waiting`.
        """
        watch = Watch(self._ctx.settings, on_notice)
        deadline = None if timeout is None else time.monotonic() + timeout
        status = None
        while True:
            status = watch.read(self.status) or status
            if status in TERMINAL:
                assert status is not None
                return status
            watch.check_workers()
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
        # One query: the row and its live counts (a progress bar asks every second).
        counts = [store.live_count(name).label(name) for name in store.COUNTERS]
        query = select(Batch.name, Batch.source, Batch.status, Batch.total, *counts)
        with session_scope(self._ctx.database_url) as session:
            row = session.execute(query.where(Batch.id == self.id)).one_or_none()
        if row is None:
            raise NotFoundError(f"batch {self.id} does not exist")
        return BatchProgress(
            id=self.id,
            name=row.name,
            source=row.source,
            status=row.status,
            total=row.total,
            queued=int(row.queued),
            running=int(row.running),
            succeeded=int(row.succeeded),
            failed=int(row.failed),
            cancelled=int(row.cancelled),
        )

    def calls_paused(self) -> str | None:
        """Why no call is being made for any job (the provider rejects the key, or the
        day's budget is spent), or ``None``."""
        settings = self._ctx.settings
        return paused_reason(settings) or daily_budget.pause_reason(settings)

    def keys_set_aside(self) -> str | None:
        """Which attachments of the pool are set aside (their key rejected) while the
        others take the calls, or ``None``."""
        return set_aside(self._ctx.settings)

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.5,
        on_progress: Callable[[BatchProgress], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> BatchProgress:
        """Block until no job of the batch is queued or running.

        Rides out a Postgres or Redis outage and says once, through ``on_notice`` (default:
        a warning on the ``batch_infer`` logger), that no worker is running; see
        :mod:`jobs.waiting`.
        """
        watch = Watch(self._ctx.settings, on_notice)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            progress = watch.read(self.progress)
            if progress is not None:
                if on_progress is not None:
                    on_progress(progress)
                if progress.finished and progress.running == 0:
                    return progress
                watch.check_workers()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {self.id} not finished after {timeout} s")
            time.sleep(poll)

    def results(self, which: Which = "all") -> Iterator[dict[str, Any]]:
        """OpenAI Batch output lines of the finished jobs, in submission order.

        ``which``: ``"output"`` (the output file: succeeded requests), ``"errors"`` (the
        error file: the rest) or ``"all"`` (both, merged); see :mod:`jobs.outputs`.
        """
        self.progress()  # raises NotFoundError for an unknown id
        role = {"output": FileRole.OUTPUT, "errors": FileRole.ERROR, "all": None}[which]
        yield from outputs.lines(self._ctx.database_url, self.id, role)

    def cancel(self) -> int:
        """Cancel the batch; returns how many jobs were stopped before sending their request.

        Every job that has not sent its request ends ``cancelled``: queued, published, or
        held by a worker waiting for its throttle slot (the worker releases the slot and
        calls nothing). Calls already on the wire finish and are recorded; the batch is
        ``cancelling`` until they do, then ``cancelled``. With none in flight it ends here.
        """
        self.progress()
        with session_scope(self._ctx.database_url) as session:
            stopped = store.cancel_batch(session, self.id)
        finalizing.finalize(self._ctx.settings, self.id)
        return stopped

    def budget(self) -> Standing:
        """The batch's budget, its spend so far, and why it is paused if it is."""
        self.progress()
        with session_scope(self._ctx.database_url) as session:
            return standing(session, self.id, self._ctx.settings.price_for)

    def set_budget(self, budget: Budget) -> None:
        """Give the batch a new budget (none: no limit), which resumes it if it paused.

        Raises :class:`~jobs.validation.ValidationError` for a batch that has ended.
        """
        self.progress()
        with session_scope(self._ctx.database_url) as session:
            if not store.set_budget(session, self.id, tokens=budget.tokens, usd=budget.usd):
                raise ValidationError(f"batch {self.id} has ended: its budget no longer matters")
        log_event("budget_set", batch=self.id, tokens=budget.tokens, usd=budget.usd)
        publish(self._ctx)

    def retry(self) -> int:
        """Re-queue the failed jobs; returns how many."""
        self.progress()
        with session_scope(self._ctx.database_url) as session:
            count = store.retry_batch(session, self.id)
        if count:
            publish(self._ctx)
        return count
