"""Connections under load fit the smallest add-on plans: counted, never timed.

One worker dyno (the default WORKER_CONCURRENCY), one beat, one web process with a
client of the Batches API polling it, and one CLI waiting on a batch run a saturating
batch on a Redis server of the test's own. Every sample counts
what the servers see (Redis ``CLIENT LIST``, PostgreSQL ``pg_stat_activity``) and
which process holds each connection (its client port, through the process table).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from devstack.procs import stop_process
from devstack.simulator import Simulator, SimulatorConfig
from jobs.settings import Settings
from tests.faults.harness import PrivateRedis
from tests.support import (
    ROOT,
    TEST_KEY,
    WEB_KEY,
    WorkerProcess,
    jsonl,
    line,
    make_settings,
    settings_env,
    start_web,
    wait_until,
)

pytestmark = pytest.mark.integration

#: Heroku Key-Value Store mini: 20 clients.
REDIS_MINI_CLIENTS = 20
#: Heroku Postgres essential-0: 20 connections.
POSTGRES_ESSENTIAL_CONNECTIONS = 20
#: Seconds of sampling: the first window's burst of calls, then steady pacing.
SAMPLE_FOR_S = 40.0


@dataclass
class Peaks:
    """The most connections seen at once, in all and per process role."""

    total: int = 0
    roles: Counter[str] = field(default_factory=Counter)

    def add(self, by_role: Counter[str]) -> None:
        # The test's own connections (fixtures, probes) are no part of the formation.
        by_role.pop("test", None)
        self.total = max(self.total, sum(by_role.values()))
        for role, count in by_role.items():
            self.roles[role] = max(self.roles[role], count)


def _owners(server_port: int, pids: dict[int, str]) -> dict[int, str]:
    """Client port -> role, for every connection of ours to ``server_port``."""
    found = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == server_port and conn.pid in pids:
            found[conn.laddr.port] = pids[conn.pid]
    return found


def _redis_clients(
    client: redis.Redis, port: int, pids: dict[int, str], names: Counter[str]
) -> Counter[str]:
    owners = _owners(port, pids)
    entries = [e for e in client.client_list() if e["id"] != str(client.client_id())]
    owners |= _owners(port, pids)  # and those opened while the server answered
    counts: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for entry in entries:
        role = owners.get(int(str(entry["addr"]).rsplit(":", 1)[1]), "other")
        counts[role] += 1
        seen[f"{role}/{entry['name'] or '-'}"] += 1
    for key, count in seen.items():
        names[key] = max(names[key], count)
    return counts


#: How long a server backend may outlive its client's socket in pg_stat_activity.
BACKEND_EXIT_S = 0.2


def _client_ports(conn: psycopg.Connection, database: str) -> list[int]:
    rows = conn.execute(
        "SELECT client_port FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    ).fetchall()
    return [int(client_port or 0) for (client_port,) in rows]


def _pg_connections(
    conn: psycopg.Connection, database: str, port: int, pids: dict[int, str]
) -> Counter[str]:
    owners = _owners(port, pids)
    ports = _client_ports(conn, database)
    owners |= _owners(port, pids)  # and those opened while the server answered
    if any(p not in owners for p in ports):
        # A backend lingers a moment after its client closed the socket: one that
        # is gone by now was closing, not held by anyone.
        time.sleep(BACKEND_EXIT_S)
        live = set(_client_ports(conn, database))
        owners |= _owners(port, pids)
        ports = [p for p in ports if p in owners or p in live]
    return Counter(owners.get(p, "other") for p in ports)


@pytest.fixture
def budget_settings(clean_db: str, tmp_path: Path) -> Iterator[Settings]:
    server = PrivateRedis(tmp_path)
    server.start()
    sim = Simulator(
        SimulatorConfig(key=TEST_KEY, rpm=150, tpm=800_000, latency_min=0.5, latency_max=3.0)
    ).start()
    try:
        # The worker's default WORKER_CONCURRENCY; the dispatch window of the suite's.
        yield make_settings(
            clean_db, server.url, sim.url, worker_concurrency=Settings().worker_concurrency
        )
    finally:
        sim.stop()
        server.stop()


def test_a_worker_beat_web_and_a_cli_fit_mini_redis_and_essential_postgres(
    budget_settings: Settings, tmp_path: Path
) -> None:
    settings = budget_settings
    assert settings.database_url is not None and settings.redis_url is not None
    env = settings_env(settings)
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl(*(line(f"b{i}") for i in range(600))))
    small = tmp_path / "small.jsonl"
    small.write_bytes(jsonl(*(line(f"s{i}") for i in range(3))))
    submit = subprocess.run(
        [sys.executable, "-m", "jobs", "submit", str(big)],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr

    worker = WorkerProcess(
        settings, tmp_path / "worker.log", concurrency=settings.worker_concurrency
    )
    beat_log = open(tmp_path / "beat.log", "wb")  # noqa: SIM115 - closed below
    beat = subprocess.Popen(
        [sys.executable, "-m", "jobs", "beat"], env=env, cwd=ROOT, stdout=beat_log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    cli = subprocess.Popen(
        [sys.executable, "-m", "jobs", "submit", str(small), "--wait"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    web = start_web(settings, tmp_path / "web.log")
    api_client = httpx.Client(base_url=web.url, headers={"Authorization": f"Bearer {WEB_KEY}"})
    # A client of the Batches API: one upload and batch (a task published), then polling.
    uploaded = api_client.post(
        "/v1/files", files={"file": ("s.jsonl", small.read_bytes())}, data={"purpose": "batch"}
    ).json()["id"]
    created = api_client.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()["id"]
    redis_port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    database = settings.database_url.rsplit("/", 1)[1]
    # The machine's server or the embedded one, whichever the suite runs on.
    pg_port = make_url(settings.database_url).port or 5432
    redis_peaks, pg_peaks = Peaks(), Peaks()
    names: Counter[str] = Counter()
    probe = redis.Redis.from_url(settings.redis_url)
    pg = psycopg.connect(settings.database_url.replace("+psycopg", ""), autocommit=True)
    try:
        worker.wait_ready()
        pids = {
            worker.pid: "worker",
            beat.pid: "beat",
            cli.pid: "cli",
            web.pid: "web",
            os.getpid(): "test",
        }
        wait_until(lambda: _pg_busy(pg, database), 30, "calls under way")
        deadline = time.monotonic() + SAMPLE_FOR_S
        while time.monotonic() < deadline:
            redis_peaks.add(_redis_clients(probe, redis_port, pids, names))
            pg_peaks.add(_pg_connections(pg, database, pg_port, pids))
            assert api_client.get(f"/v1/batches/{created}").status_code == 200
            time.sleep(0.2)
        assert beat.poll() is None and cli.poll() is None, "beat and the CLI ran throughout"
        started = pg.execute("SELECT count(*) FROM attempts").fetchone()
    finally:
        for proc in (cli, beat):
            stop_process(proc)
        beat_log.close()
        api_client.close()
        web.stop(10)
        worker.stop()
        probe.close()
        pg.close()
    print(
        f"connections redis total={redis_peaks.total} {dict(redis_peaks.roles)} "
        f"postgres total={pg_peaks.total} {dict(pg_peaks.roles)} calls={started} "
        f"redis by client name {dict(names)}"
    )
    # The batch saturated the key: the first window's whole quota was called.
    assert started is not None and started[0] >= 150
    # Beat never touches the database; the rest use both.
    assert set(redis_peaks.roles) == {"worker", "beat", "cli", "web"}, redis_peaks
    assert set(pg_peaks.roles) == {"worker", "cli", "web"}, pg_peaks
    assert redis_peaks.total <= REDIS_MINI_CLIENTS, redis_peaks
    assert pg_peaks.total <= POSTGRES_ESSENTIAL_CONNECTIONS, pg_peaks


def _pg_busy(conn: psycopg.Connection, database: str) -> bool:
    row = conn.execute("SELECT count(*) FROM attempts").fetchone()
    return row is not None and row[0] > 0
