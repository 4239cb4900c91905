"""Handles on stored jobs and batches: progress, waiting, results, cancel and retry.

Handles read Postgres only, so they work from any process; waiting rides out outages
and says when no worker runs (:mod:`jobs.waiting`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from jobs import store
from jobs.batchfile import output_line
from jobs.circuit import paused_reason
from jobs.context import Context, publish
from jobs.db import session_scope
from jobs.models import TERMINAL, Batch, Job, JobStatus
from jobs.waiting import Watch


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
            publish(self._ctx)
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
