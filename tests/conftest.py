"""Shared fixtures: a throw-away database, a flushed Redis database, the simulator.

DATABASE_URL and REDIS_URL are used when set (CI points them at a fresh
database and a Redis database number it flushes); otherwise the embedded
servers under VAR_DIR are started or joined. Each test session works in its own
new PostgreSQL database, dropped at the end, so a developer's data is never
touched.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from devstack import embedded
from devstack.simulator import Simulator, SimulatorConfig
from jobs import migrate
from jobs.connections import redis_client
from jobs.settings import Settings, normalize_database_url
from tests.support import TEST_KEY, WorkerProcess, create_database, drop_database, make_settings


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """The servers under test, before any per-session database is created."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "NIGHTLY_"))}
    return embedded.resolve(Settings.from_env(env))


@pytest.fixture(scope="session")
def database_url(base_settings: Settings) -> Iterator[str]:
    """A new database migrated to head, dropped when the session ends."""
    assert base_settings.database_url is not None
    url = create_database(normalize_database_url(base_settings.database_url))
    migrate.upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture
def clean_db(database_url: str) -> Iterator[str]:
    """The session database, emptied after the test."""
    yield database_url
    with psycopg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as conn:
        conn.execute("TRUNCATE attempts, jobs, batches, batch_moves RESTART IDENTITY CASCADE")


@pytest.fixture
def redis_url(base_settings: Settings) -> Iterator[str]:
    """The Redis database under test, flushed before and after each test."""
    assert base_settings.redis_url is not None
    client = redis_client(base_settings.redis_url)
    client.flushdb()
    yield base_settings.redis_url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    sim = Simulator(SimulatorConfig(key=TEST_KEY)).start()
    yield sim
    sim.stop()


@pytest.fixture
def settings(clean_db: str, redis_url: str, simulator: Simulator) -> Settings:
    return make_settings(clean_db, redis_url, simulator.url)


@pytest.fixture
def worker_process(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    """The logfmt lines logged during the test (``batch_infer`` logger)."""
    logger = logging.getLogger("batch_infer")
    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="batch_infer")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "batch_infer"]
    logger.propagate = propagate


@pytest.fixture
def nightly_file(tmp_path: Path) -> Path:
    path = tmp_path / "nightly.jsonl"
    lines = [
        {
            "custom_id": f"n{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "kimi-k2-5", "messages": [{"role": "user", "content": f"n{i}"}]},
        }
        for i in range(5)
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path
