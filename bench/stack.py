"""The real stack one scenario runs on: database, Redis, simulator processes (one per
attachment of the pool), worker processes.

Everything here talks to the system from the outside, the way an operator would: a fresh
database migrated with :mod:`jobs.migrate`, environment variables read by
:meth:`jobs.settings.Settings.from_env`, the simulator started with
``python -m devstack.simulator`` and workers started with the CLI's own Celery command line.
Every process and database a :class:`Stack` creates is gone when it closes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import redis
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from devstack import embedded
from devstack.procs import ROOT, WorkerProcess, free_port, stop_process
from jobs import api, db, migrate
from jobs.connections import redis_client
from jobs.environment import worker_argv
from jobs.settings import Settings, normalize_database_url

#: First Redis database the benchmark owns and flushes, one more per lane (1 to 4 with
#: the default 4 lanes; the embedded services' default is 0, CI's tests use 13).
DEFAULT_REDIS_DB = 1
Charge = Literal["reserve", "actual"]


def _scrubbed_environ() -> dict[str, str]:
    """This process's environment without anything that would redirect a child process."""
    drop = ("INFERENCE_", "NIGHTLY_", "WORKER_", "DISPATCH_", "SIMULATOR_")
    names = ("DATABASE_URL", "REDIS_URL", "LOG_BODIES", "MAINTENANCE_CRON")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in names}


def with_redis_db(url: str, number: int) -> str:
    """``url`` pointing at Redis database ``number`` (same server, scheme and options)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{number}", parts.query, parts.fragment))


def conninfo(url: str, database: str | None = None) -> str:
    """A libpq connection string for a SQLAlchemy URL (optionally another database)."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@dataclass(frozen=True)
class Servers:
    """Where the run's databases and Redis database live."""

    #: SQLAlchemy URL of the PostgreSQL server (its database is only used to connect).
    postgres_url: str
    #: Redis URL of the benchmark's own database number.
    redis_url: str

    @classmethod
    def resolve(cls, redis_db: int) -> Servers:
        """DATABASE_URL's and REDIS_URL's servers when set, else the embedded ones."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "NIGHTLY_"))}
        settings = embedded.resolve(Settings.from_env(env))
        assert settings.database_url is not None and settings.redis_url is not None
        return cls(
            postgres_url=normalize_database_url(settings.database_url),
            redis_url=with_redis_db(settings.redis_url, redis_db),
        )

    def create_database(self, prefix: str = "bench") -> str:
        """Create an empty database on the server; returns its SQLAlchemy URL."""
        name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
        with psycopg.connect(conninfo(self.postgres_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return make_url(self.postgres_url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database`, closing this process's pools."""
        db.dispose_all()
        name = make_url(url).database
        with psycopg.connect(conninfo(url, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class SimSpec:
    """Command-line configuration of one simulator process."""

    rpm: int | None = None
    tpm: int | None = None
    charge: Charge = "reserve"
    latency: tuple[float, float] = (0.0, 0.0)
    chars_per_token: float = 4.0
    window_s: float = 60.0
    #: Whether answers carry ``x-ratelimit-*`` headers.
    ratelimit_headers: bool = True

    def argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "devstack.simulator", "--port", str(port)]
        if self.rpm is not None:
            argv += ["--rpm", str(self.rpm)]
        if self.tpm is not None:
            argv += ["--tpm", str(self.tpm)]
        low, high = self.latency
        argv += [
            "--window", f"{self.window_s:g}", "--charge", self.charge,
            "--chars-per-token", f"{self.chars_per_token:g}", "--latency", f"{low:g}:{high:g}",
        ]  # fmt: skip
        if not self.ratelimit_headers:
            argv.append("--no-ratelimit-headers")
        return argv

    @property
    def mean_latency(self) -> float:
        return (self.latency[0] + self.latency[1]) / 2


class SimulatorProcess:
    """``python -m devstack.simulator`` in its own OS process, so it never shares our GIL."""

    def __init__(self, spec: SimSpec, key: str, log_path: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = _scrubbed_environ() | {"SIMULATOR_KEY": key, "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            spec.argv(self.port), env=env, cwd=ROOT, stdout=self._log, stderr=self._log,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self._http = httpx.Client(base_url=self.url, timeout=10.0)
        deadline = time.monotonic() + 20.0
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the simulator exited at start; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                self.stats()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulator did not answer within 20 s; see {log_path}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, int]:
        """The simulator's own counters (``GET /stats``)."""
        reply = self._http.get("/stats")
        reply.raise_for_status()
        data = reply.json()
        return {str(k): int(v) for k, v in data.items()}

    def calls(self) -> list[dict[str, object]]:
        """The simulator's call records (``GET /calls``), oldest first."""
        reply = self._http.get("/calls", timeout=60.0)
        reply.raise_for_status()
        calls: list[dict[str, object]] = reply.json()["calls"]
        return calls

    def reset(self) -> None:
        """Clear its counters and rate-limit window (``POST /reset``)."""
        self._http.post("/reset").raise_for_status()

    def outage(self, seconds: float, status: int) -> None:
        """Answer every call with ``status`` for ``seconds`` (``POST /outage``); 401: the
        key is rejected."""
        self._http.post("/outage", json={"seconds": seconds, "status": status}).raise_for_status()

    def stop(self) -> None:
        self._http.close()
        stop_process(self.proc, 15.0)
        self._log.close()


@dataclass(frozen=True)
class Attached:
    """One more attachment of the pool: its own simulator, key and limits."""

    sim: SimSpec
    #: <ALIAS>_RPM / <ALIAS>_TPM given to the system.
    rpm: int
    tpm: int


@dataclass(frozen=True)
class StackSpec:
    """What a scenario asks of the stack: provider behaviour and the system's settings."""

    sim: SimSpec
    #: INFERENCE_RPM / INFERENCE_TPM given to the system (what it believes the limits are).
    rpm: int
    tpm: int
    #: WORKER_CONCURRENCY given to the system; None: its default for the limits.
    concurrency: int | None = None
    #: DISPATCH_WINDOW given to the system; None: its default for the limits.
    dispatch_window: int | None = None
    #: INFERENCE_INTERACTIVE_RESERVE given to the system.
    interactive_reserve: int = Settings().interactive_reserve
    #: Further variables given to the system (prices, budgets).
    env: tuple[tuple[str, str], ...] = ()
    #: Attachments beyond ``INFERENCE`` (named INFERENCE_2, INFERENCE_3, ...): with any,
    #: the system runs on INFERENCE_POOL.
    pool: tuple[Attached, ...] = ()

    @property
    def aliases(self) -> tuple[str, ...]:
        return ("INFERENCE", *(f"INFERENCE_{n}" for n in range(2, len(self.pool) + 2)))


class Stack:
    """A fresh database, the flushed Redis database, one simulator and N workers.

    Use as a context manager; closing stops the workers (SIGTERM, then SIGKILL), the
    simulator, flushes the Redis database and drops the database, whatever happened.
    """

    def __init__(self, servers: Servers, spec: StackSpec, logs: Path, name: str) -> None:
        self.servers = servers
        self.spec = spec
        self.logs = logs
        self.name = name
        self.key = "bench-" + secrets.token_urlsafe(12)
        self.workers: list[WorkerProcess] = []
        self._cleanup = contextlib.ExitStack()
        self.database_url = ""
        self.redis: redis.Redis | None = None
        self.sim: SimulatorProcess | None = None
        #: Every attachment's simulator by alias, ``INFERENCE``'s (``sim``) first.
        self.sims: dict[str, SimulatorProcess] = {}
        self.env: dict[str, str] = {}
        self.settings = Settings()

    def __enter__(self) -> Stack:
        try:
            self._open()
        except BaseException:
            self._cleanup.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup.close()

    def _open(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        client = redis_client(self.servers.redis_url)
        client.flushdb()
        self.redis = client

        def _flush_redis() -> None:
            with contextlib.suppress(redis.RedisError):
                client.flushdb()
            client.close()

        self._later(_flush_redis)
        self.database_url = self.servers.create_database()
        url = self.database_url
        self._later(lambda: self.servers.drop_database(url))
        migrate.upgrade(self.database_url)
        self.sim = SimulatorProcess(self.spec.sim, self.key, self.logs / f"{self.name}-sim.log")
        self._later(self.sim.stop)
        self.sims = {"INFERENCE": self.sim}
        for alias, other in zip(self.spec.aliases[1:], self.spec.pool, strict=True):
            log = self.logs / f"{self.name}-sim-{alias.lower()}.log"
            sim = SimulatorProcess(other.sim, f"{self.key}-{alias.lower()}", log)
            self._later(sim.stop)
            self.sims[alias] = sim
        self._later(self.stop_workers)
        self.env = self._environment()
        self.settings = Settings.from_env(self.env)
        # Runs first: workers shutting down should not start the rest of a backlog.
        self._later(self.cancel_batches)

    def _later(self, step: Callable[[], object]) -> None:
        """Register a closing step; a failing step is reported and the others still run.

        Closing must not turn a measured row into an error, so failures go to stderr.
        """

        def guarded() -> None:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - report, then keep closing
                print(f"bench: closing {self.name}: {type(exc).__name__}: {exc}", file=sys.stderr)

        self._cleanup.callback(guarded)

    def _environment(self) -> dict[str, str]:
        assert self.sim is not None
        env = _scrubbed_environ()
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.servers.redis_url,
            INFERENCE_URL=self.sim.url,
            INFERENCE_KEY=self.key,
            INFERENCE_RPM=str(self.spec.rpm),
            INFERENCE_TPM=str(self.spec.tpm),
            INFERENCE_TPM_CHARGE=self.spec.sim.charge,
            INFERENCE_INTERACTIVE_RESERVE=str(self.spec.interactive_reserve),
            PYTHONUNBUFFERED="1",
            # Heroku's SIGTERM, handled as the Procfile's worker does.
        )
        if self.spec.pool:
            env["INFERENCE_POOL"] = ",".join(self.spec.aliases)
            for alias, other in zip(self.spec.aliases[1:], self.spec.pool, strict=True):
                sim = self.sims[alias]
                env |= {
                    f"{alias}_URL": sim.url,
                    f"{alias}_KEY": f"{self.key}-{alias.lower()}",
                    f"{alias}_RPM": str(other.rpm),
                    f"{alias}_TPM": str(other.tpm),
                }
        if self.spec.concurrency is not None:
            env["WORKER_CONCURRENCY"] = str(self.spec.concurrency)
        if self.spec.dispatch_window is not None:
            env["DISPATCH_WINDOW"] = str(self.spec.dispatch_window)
        env.update(self.spec.env)
        return env

    @property
    def simulator(self) -> SimulatorProcess:
        assert self.sim is not None, "the stack is not open"
        return self.sim

    @property
    def redis_conn(self) -> redis.Redis:
        assert self.redis is not None, "the stack is not open"
        return self.redis

    def start_workers(
        self,
        count: int,
        argv: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start ``count`` worker processes and wait until each reports ready.

        By default each is the CLI's worker (``jobs.environment.worker_argv``) on this stack's
        settings; ``argv`` and ``env`` run another Celery app instead.
        """
        start = len(self.workers)
        for index in range(start, start + count):
            log = self.logs / f"{self.name}-worker{index}.log"
            base = argv if argv is not None else worker_argv(self.settings)
            node = ["--hostname", f"bench{index}-{secrets.token_hex(3)}@%h"]
            self.workers.append(WorkerProcess(base + node, env or self.env, log))
        for worker in self.workers[start:]:
            worker.wait_ready()

    def stop_workers(self) -> None:
        """Stop every worker (all signalled at once, then each awaited)."""
        for worker in self.workers:
            worker.signal_stop()
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def cancel_batches(self) -> int:
        """Cancel the queued jobs of every unfinished batch (through the API); returns how many.

        Best effort, as part of closing: a cancel that keeps failing (a deadlock with a
        worker's claim, say) is given up after a few tries, since the workers are stopped
        and the database dropped right after.
        """
        with psycopg.connect(conninfo(self.database_url)) as conn:
            ids = [
                int(row[0])
                for row in conn.execute("SELECT id FROM batches WHERE status = 'in_progress'")
            ]
        cancelled = 0
        for batch_id in ids:
            for attempt in range(3):
                try:
                    cancelled += api.get_batch(batch_id, settings=self.settings).cancel()
                    break
                except sqlalchemy.exc.OperationalError:
                    time.sleep(0.5 * (attempt + 1))
        return cancelled

    def worker_log_count(self, needle: str) -> int:
        """How many lines of the workers' logs contain ``needle``."""
        total = 0
        for path in self.logs.glob(f"{self.name}-worker*.log"):
            total += sum(needle in line for line in path.read_text(errors="replace").splitlines())
        return total


@dataclass(frozen=True)
class Run:
    """What every scenario of one benchmark run shares."""

    servers: Servers
    logs: Path
    quick: bool

    @property
    def scale(self) -> int:
        """Limit multiplier: quick mode runs 10x the limits (and latencies a tenth)."""
        return 10 if self.quick else 1

    def latency(self, low: float, high: float) -> tuple[float, float]:
        """A full-mode latency range, shortened in quick mode."""
        return (low / self.scale, high / self.scale)

    def stack(self, name: str, spec: StackSpec) -> Stack:
        return Stack(self.servers, spec, self.logs, name)
