"""What every fault test shares: a fleet of real worker processes, a batch, and
the invariants checked after the fault.

The invariants (issue: "nothing lost, nothing double-billed"):

* every job ends succeeded, failed (with its error kept) or cancelled;
* every call the simulator saw carries our call id (``bi-<job>-<attempt>``) and
  has its ledger row, and every ledger row has its call at the simulator (only a
  killed worker's row may have none: it died before sending); a job is recorded
  answered at most once;
* every ledger row says what the simulator answered: its status and kind of error,
  or a timeout with no status where the simulator found the connection closed
  before its answer was ready (a live worker's read timeout gave up on it);
* every 200 the ledger recorded has the simulator's own token counts and was
  delivered to its worker, and the ledger's token totals (and its jobs') are the
  simulator's, less only the paid calls a kill lost;
* a paid call (admitted, so charged) the ledger could not record is a row marked
  ``abandoned``, and only killed workers leave them. The simulator tells two
  kinds apart: *cut*, its worker was gone before the answer was ready (nobody
  read it), and *extra paid*, the answer reached a live worker that died before
  its commit. A job is answered 200 to a live worker more than once only through
  extra paid calls. A kill loses only calls its worker had in flight, as the
  simulator saw them: every lost call is one the killed worker logged, and it was
  still unanswered when the kill came (cut) or answered at most
  :data:`COMMIT_GAP_S` before it (extra paid: the answer had not been committed
  yet). So a kill costs no more paid calls than the simulator saw in flight to
  that worker; with many in flight it can cost more than one;
* the simulator refused none of our calls with a 429. It admits within the limits
  whatever it is sent, so the window figures it keeps cannot show us sending too
  much; a strict window refuses every call beyond them, so no 429 means no window
  ever held more of our calls than the limits. That says something of the throttle
  only where the limits bind (the Redis-restart test checks that they did).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from devstack.procs import free_port, stop_process
from devstack.simulator import SimCall, Simulator
from jobs import api
from jobs.api import BatchHandle, BatchProgress
from jobs.connections import redis_client
from jobs.db import session_scope
from jobs.models import Attempt, Job, JobStatus
from jobs.settings import Settings
from jobs.store import ABANDONED
from tests.support import WorkerProcess, wait_until

#: Seconds a call may still take to be answered once its batch is finished: the
#: suite's simulator latency is at most 1.5 s, its hangs last at most 6 s.
SETTLE_S = 15.0

#: Longest a worker may take from reading a paid answer to committing it, on the suite's
#: loaded 2-core machine: a kill within this long after an answer arrived may lose it
#: (an extra paid call). The runner commits before any other bookkeeping; measured:
#: 11 ms at most over 6 such answers.
COMMIT_GAP_S = 0.5

#: A worker's log lines for a job it claimed, and for a call it is about to make.
_STARTED = re.compile(r"event=started job=(\d+) ")
# The fields between them (batch, attachment) are not positional.
_ATTEMPT = re.compile(r"event=attempt job=(\d+) (?:\S+ )*?attempt=(\d+)")

#: The ``error_kind`` a worker records for each outcome it reads (``None``: success).
RECORDED_KIND: dict[str, str | None] = {
    "ok": None,
    "rate_limited": "rate_limited",
    "server_error": "server_error",
    "hang": "server_error",  # the 504 that ends a hang
    "malformed": "malformed",
}


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


@dataclass(frozen=True)
class Kill:
    """One ``kill -9``: the calls its worker made and when it died.

    Times are ``time.monotonic()`` of the test process, the clock of the simulator's
    call log (the simulator runs in the test process).
    """

    #: The jobs the killed worker claimed (a row it wrote may lack a logged call: it
    #: writes a call's ledger row, then logs the call, then sends it).
    jobs: frozenset[int]
    #: The call ids (``bi-<job>-<attempt>``) it logged, each before sending the call.
    calls: frozenset[str]
    #: Just before the signal was sent.
    signalled_at: float
    #: Once the process was reaped.
    dead_at: float


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

    def kill(self, worker: WorkerProcess, *, grace_s: float | None = None) -> Kill:
        """``kill -9``: no handler runs, in-flight calls are cut. With ``grace_s``, the way
        Heroku stops a dyno: SIGTERM, and the SIGKILL ``grace_s`` later if it still runs
        (``signalled_at`` is then the SIGKILL's moment, or the exit's)."""
        if grace_s is not None:
            worker.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                worker.proc.wait(grace_s)
        signalled_at = time.monotonic()
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        dead_at = time.monotonic()
        # The log is unbuffered: every job the worker claimed and every call it sent is in it.
        log = worker.log()
        jobs = frozenset(int(job) for job in _STARTED.findall(log))
        calls = frozenset(f"bi-{job}-{n}" for job, n in _ATTEMPT.findall(log))
        return Kill(jobs=jobs, calls=calls, signalled_at=signalled_at, dead_at=dead_at)

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
    #: Ledger rows of the batch marked ``abandoned`` (a worker lost mid-call).
    abandoned: int = 0
    #: Paid calls whose worker was gone before the answer was ready: nobody read them.
    cut: int = 0
    #: Paid 200s delivered to a live worker beyond the one the ledger recorded for the
    #: job: the worker died between the answer and its commit.
    extra_paid: int = 0
    #: Calls the simulator saw in flight to a worker when it was killed (not answered
    #: when the signal was sent): the most a kill can cut.
    in_flight_at_kills: int = 0
    failed_errors: Counter[str] = field(default_factory=Counter)

    def line(self, fault: str, **extra: object) -> str:
        figures = {
            "jobs": self.jobs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "calls": self.calls,
            "abandoned": self.abandoned,
            "cut": self.cut,
            "extra_paid": self.extra_paid,
            "in_flight_at_kills": self.in_flight_at_kills,
        } | extra
        return f"fault={fault} " + " ".join(f"{k}={v}" for k, v in figures.items())


def recorded_as(call: SimCall) -> tuple[int | None, str | None]:
    """``(http_status, error_kind)`` of the ledger row of ``call`` if its worker recorded it."""
    if not call.delivered:
        return None, "timeout"  # the connection was closed before the answer was ready
    if call.outcome == "client_error":
        return call.status, "auth" if call.status in (401, 403) else "rejected"
    return call.status, RECORDED_KIND[call.outcome]


def check_invariants(
    settings: Settings,
    sim: Simulator,
    batch: BatchHandle,
    *,
    kills: Sequence[Kill] = (),
) -> Invariants:
    """Assert the invariants of the module docstring; return the figures.

    ``kills`` are the workers killed with ``kill -9`` during the run (:meth:`Fleet.kill`).
    """
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
        ledger_tokens = s.execute(
            select(
                func.coalesce(func.sum(Attempt.prompt_tokens), 0),
                func.coalesce(func.sum(Attempt.completion_tokens), 0),
                func.coalesce(func.sum(Attempt.total_tokens), 0),
            )
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.batch_id == batch.id)
        ).one()
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

    found.abandoned = sum(r.error_kind == ABANDONED for r in rows)

    # A killed worker's call may still be in its simulated latency, a call our read
    # timeout gave up on in its hang: wait for their answers.
    wait_until(
        lambda: all(c.delivered is not None for c in sim.calls()),
        SETTLE_S,
        "every call answered or cut",
    )
    stats, calls = sim.snapshot()
    assert stats.calls == len(calls), "the simulator dropped call records"
    found.calls = len(calls)
    by_id = {c.client_request_id: c for c in calls}
    assert len(by_id) == len(calls), "the simulator saw a call id twice"
    # Ledger to simulator: every row's call reached the provider. A killed worker's
    # row may have none (it died between the row and the call); it is abandoned.
    killed = frozenset[int]().union(*(k.jobs for k in kills))
    for key, kept in ledger.items():
        if kept.error_kind == ABANDONED:
            assert kept.job_id in killed, f"a row abandoned by no killed worker: {kept}"
        else:
            assert key in by_id, f"the ledger has a call the simulator never saw: {kept}"
    # Simulator to ledger: every call has its row, which says what the simulator answered.
    delivered_ok: Counter[int] = Counter()
    lost: list[SimCall] = []  # paid, and not in the ledger: a killed worker's
    for call in calls:
        row = ledger.get(call.client_request_id or "")
        assert row is not None, f"the simulator saw a call the ledger does not know: {call}"
        if row.error_kind != ABANDONED:  # its worker recorded it (abandoned: see below)
            assert (row.http_status, row.error_kind) == recorded_as(call), (
                f"ledger row {row} does not say what the simulator answered: {call}"
            )
        if call.outcome != "ok":  # not admitted, not charged
            continue
        recorded = row.http_status == 200 and row.error_kind is None
        if recorded:
            assert call.delivered, f"a 200 recorded that the simulator never delivered: {call}"
            assert (row.prompt_tokens, row.completion_tokens) == (
                call.prompt_tokens,
                call.completion_tokens,
            ), f"ledger row {row} disagrees with the simulator's {call}"
        else:
            # Charged, but its worker died before recording it: the ledger keeps the row.
            assert row.error_kind == ABANDONED, f"paid call not in the ledger: {row} {call}"
            lost.append(call)
        if call.delivered:
            delivered_ok[row.job_id] += 1
        else:
            found.cut += 1
    # Each job's recorded 200 is one of its delivered ones (asserted above); any other
    # delivered 200 is an answer a live worker received and lost with its process.
    found.extra_paid = sum(n - (job_id in ok_rows) for job_id, n in delivered_ok.items())
    for call in lost:
        check_lost_by_a_kill(call, kills)
    found.in_flight_at_kills = sum(in_flight_at(kill, calls) for kill in kills)
    if not kills:
        unrecorded = (found.abandoned, found.cut)
        assert unrecorded == (0, 0), f"abandoned, cut = {unrecorded} with no worker killed"

    # The provider's token counts, both ways: what the ledger recorded plus the paid
    # calls it could not record are what the simulator charged, and the jobs hold the
    # ledger's answered tokens.
    unrecorded_tokens = (
        sum(c.prompt_tokens for c in lost),
        sum(c.completion_tokens for c in lost),
        sum(c.prompt_tokens + c.completion_tokens for c in lost),
    )
    ledger_plus_lost = tuple(a + b for a, b in zip(ledger_tokens, unrecorded_tokens, strict=True))
    charged = (stats.prompt_tokens, stats.completion_tokens, stats.total_tokens)
    assert ledger_plus_lost == charged, (tuple(ledger_tokens), unrecorded_tokens, charged)
    assert sum(j.total_tokens or 0 for j in jobs) == ledger_tokens[2], "jobs hold other tokens"

    assert stats.rate_limited == 0, f"the simulator refused calls over its limits: {stats}"
    return found


def check_lost_by_a_kill(call: SimCall, kills: Sequence[Kill]) -> None:
    """Assert that a paid call the ledger could not record was in flight at a kill.

    It is one the killed worker logged, and either its answer was ready only after the
    kill began (cut: nobody read it) or it was read at most :data:`COMMIT_GAP_S` before
    (extra paid: the worker died before committing it).
    """
    kill = next((k for k in kills if call.client_request_id in k.calls), None)
    assert kill is not None, f"a paid call lost by no killed worker: {call}"
    assert call.settled_at is not None
    if call.delivered:
        assert kill.signalled_at - COMMIT_GAP_S <= call.settled_at <= kill.dead_at, (
            f"answered {kill.signalled_at - call.settled_at:.3f} s before its worker was "
            f"killed, yet not recorded: {call}"
        )
    else:
        assert call.settled_at >= kill.signalled_at, f"cut before its worker was killed: {call}"


def in_flight_at(kill: Kill, calls: Sequence[SimCall]) -> int:
    """The killed worker's calls the simulator had not answered when the kill came."""
    return sum(
        c.client_request_id in kill.calls
        and (c.settled_at is None or c.settled_at >= kill.signalled_at)
        for c in calls
    )


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
