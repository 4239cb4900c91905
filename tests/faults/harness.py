"""What every fault test shares: a fleet of real worker processes, a batch, and
the invariants checked after the fault.

The invariants (issue: "nothing lost, nothing double-billed"):

* every job ends succeeded, failed (with its error kept) or cancelled;
* every call the simulator saw carries our call id (``bi-<job>-<attempt>``) and
  has its ledger row; a job is answered 200 and recorded at most once;
* every 200 the ledger recorded has the simulator's own token counts; a paid
  call the ledger could not record (its worker was killed before the answer
  arrived) is a row marked ``abandoned``, and only killed workers leave them;
* the simulator never admitted more than the limits in any window.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from jobs import api
from jobs.api import BatchHandle, BatchProgress
from jobs.connections import redis_client
from jobs.db import session_scope
from jobs.models import Attempt, Job, JobStatus
from jobs.settings import Settings
from jobs.simulator import Simulator
from tests.support import WorkerProcess, free_port, stop_process, wait_until


def requests(n: int, *, tag: str, max_tokens: int = 40) -> list[dict[str, object]]:
    """``n`` distinct batch lines (distinct bodies, so the simulator can spot a body paid twice)."""
    return [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "kimi-k2-5",
                "messages": [{"role": "user", "content": f"{tag} request number {i}"}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(n)
    ]


class Fleet:
    """Worker processes (each a dyno stand-in) that a test can kill for real."""

    def __init__(self, settings: Settings, directory: Path, *, concurrency: int = 40) -> None:
        self.settings = settings
        self.directory = directory
        self.concurrency = concurrency
        self.workers: list[WorkerProcess] = []

    def start(self, n: int = 1, *, wait: bool = True) -> list[WorkerProcess]:
        started = [
            WorkerProcess(
                self.settings,
                self.directory / f"worker-{len(self.workers) + i}.log",
                concurrency=self.concurrency,
            )
            for i in range(n)
        ]
        self.workers.extend(started)
        if wait:
            for worker in started:
                worker.wait_ready()
        return started

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc.poll() is None]

    def kill(self, worker: WorkerProcess) -> None:
        """``kill -9``: no handler runs, in-flight calls are cut."""
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@contextmanager
def fleet(settings: Settings, directory: Path, **kwargs: int) -> Iterator[Fleet]:
    running = Fleet(settings, directory, **kwargs)
    try:
        yield running
    finally:
        running.stop()


def submit(settings: Settings, n: int, *, tag: str) -> BatchHandle:
    return api.submit_batch(requests(n, tag=tag), name=tag, settings=settings)


def wait_finished(batch: BatchHandle, timeout: float, fleet: Fleet | None = None) -> BatchProgress:
    """The batch's progress once nothing is queued or running; fails with the counts if not."""
    deadline = time.monotonic() + timeout
    while True:
        progress = batch.progress()
        if progress.finished:
            return progress
        if time.monotonic() > deadline:
            tail = fleet.logs()[-3000:] if fleet else ""
            raise AssertionError(f"batch not finished after {timeout:g} s: {progress}\n{tail}")
        time.sleep(0.5)


@dataclass
class Invariants:
    """What the check found; the figures a fault test reports."""

    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    calls: int = 0
    abandoned: int = 0
    #: Calls the provider answered 200 (and charged) for a job already answered.
    extra_paid: int = 0
    failed_errors: Counter[str] = field(default_factory=Counter)

    def line(self, fault: str, **extra: object) -> str:
        figures = {
            "jobs": self.jobs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "calls": self.calls,
            "abandoned": self.abandoned,
            "extra_paid": self.extra_paid,
        } | extra
        return f"fault={fault} " + " ".join(f"{k}={v}" for k, v in figures.items())


def check_invariants(
    settings: Settings, sim: Simulator, batch: BatchHandle, *, kills: int = 0
) -> Invariants:
    """Assert the invariants of the module docstring; return the figures."""
    assert settings.database_url is not None
    progress = batch.progress()
    assert progress.finished and progress.queued == progress.running == 0, progress
    found = Invariants(jobs=progress.total, succeeded=progress.succeeded, failed=progress.failed)
    with session_scope(settings.database_url) as s:
        jobs = s.execute(
            select(Job.id, Job.status, Job.error_code, Job.last_error, Job.total_tokens).where(
                Job.batch_id == batch.id
            )
        ).all()
        rows = s.execute(
            select(
                Attempt.job_id,
                Attempt.number,
                Attempt.http_status,
                Attempt.error_kind,
                Attempt.prompt_tokens,
                Attempt.completion_tokens,
            )
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.batch_id == batch.id)
        ).all()
    assert len(jobs) == progress.total
    for _, status, code, error, _ in jobs:
        assert status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
        if status == JobStatus.FAILED:
            assert code and error, "a failed job keeps its last error"
            found.failed_errors[code] += 1
    ledger = {f"bi-{r.job_id}-{r.number}": r for r in rows}
    ok_rows = Counter(r.job_id for r in rows if r.http_status == 200 and r.error_kind is None)
    assert max(ok_rows.values(), default=0) <= 1, "a job recorded as answered twice"
    succeeded = {job_id for job_id, status, *_ in jobs if status == JobStatus.SUCCEEDED}
    assert set(ok_rows) == succeeded, "every succeeded job has exactly one 200 in the ledger"

    calls = sim.calls()
    found.calls = len(calls)
    paid: Counter[int] = Counter()
    for call in calls:
        row = ledger.get(call.client_request_id or "")
        assert row is not None, f"the simulator saw a call the ledger does not know: {call}"
        if call.outcome == "ok":  # admitted and charged
            paid[row.job_id] += 1
            if row.http_status == 200 and row.error_kind is None:
                assert (row.prompt_tokens, row.completion_tokens) == (
                    call.prompt_tokens,
                    call.completion_tokens,
                ), f"ledger row {row} disagrees with the simulator's {call}"
            else:
                # Answered and charged after its worker died: the ledger keeps the row.
                assert row.error_kind == "abandoned", f"paid call not in the ledger: {row} {call}"
                found.abandoned += 1
    found.extra_paid = sum(n - 1 for n in paid.values() if n > 1)
    if kills == 0:
        assert found.abandoned == 0, "only a killed worker leaves a paid call unrecorded"
    stats = sim.stats()
    assert stats.max_requests_in_window <= settings.rpm, stats
    assert stats.max_tokens_in_window <= settings.tpm, stats
    return found


SYSTEM_REDIS = "/usr/bin/redis-server"


class PrivateRedis:
    """A ``redis-server`` of the test's own that keeps nothing on disk, so a restart loses all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            SYSTEM_REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.directory),
        ]  # fmt: skip
        with open(self.directory / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        wait_until(self._ping, 20, "the private redis-server answering")

    def _ping(self) -> bool:
        client = redis_client(self.url)
        try:
            return bool(client.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False
        finally:
            client.close()

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
