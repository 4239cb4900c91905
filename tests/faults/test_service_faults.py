"""Redis restarting with its data lost, and Postgres restarting or away for 20 s, mid-batch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from devstack import embedded
from devstack.simulator import Simulator, SimulatorConfig
from jobs import migrate
from jobs.connections import redis_client
from jobs.constants import throttle_total_key
from tests.faults.conftest import RPM, TPM, fault_settings
from tests.faults.harness import PrivateRedis, check_invariants, fleet, submit, wait_finished
from tests.integration.throttle_helpers import entries
from tests.support import TEST_KEY, create_database, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.mark.timeout(300)
def test_redis_restart_with_its_data_lost_mid_batch(
    clean_db: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    # A tight request limit, so the throttle's lost state matters: after the restart
    # the bucket must be rebuilt from the ledger, not start empty.
    rpm = 400
    sim = Simulator(
        SimulatorConfig(key=TEST_KEY, rpm=rpm, tpm=3_000_000, latency_min=0.3, latency_max=1.5)
    ).start()
    try:
        settings = fault_settings(clean_db, private_redis.url, sim.url, rpm=rpm)
        # Four messages a worker (up to 40 jobs), as 40 single-job messages were before
        # messages carried ten: the rest of the dispatch window (200 jobs) waits in Redis,
        # where the crash loses it and the dispatcher publishes it again.
        with fleet(settings, tmp_path, concurrency=4) as f:
            f.start(2)
            batch = submit(settings, 600, tag="redis")
            wait_until(lambda: sim.stats().ok >= 150, 60, "150 calls answered")
            private_redis.crash()
            crashed = time.monotonic()
            time.sleep(2)
            private_redis.start()  # empty: queue, throttle log and locks are gone
            restarted = time.monotonic()
            seeded = rebuilt_bucket(private_redis.url, settings.bucket_name)
            progress = wait_finished(batch, 200, f)
            recovered_s = time.monotonic() - restarted
            assert all(w.proc.poll() is None for w in f.workers), "no worker died"
            assert "event=republishing" in f.logs()
        # The limit bound: the throttle filled windows close to it (its turns, one every
        # 61 s / 400, hold about 393 calls in any 60 s), never past it, and the
        # provider refused none of our calls.
        stats = sim.stats()
        assert rpm * 60 // 61 - 5 <= stats.max_requests_in_window <= rpm, stats
        assert stats.rate_limited == 0, stats
        # The provider still counts every call it admitted before the crash, so the
        # rebuilt bucket holds them all (each had its ledger row before it was sent),
        # priced no lower than the provider charged them.
        counted = [c for c in sim.calls() if c.admitted_at is not None and c.admitted_at < crashed]
        assert len(seeded) >= len(counted), (len(seeded), len(counted))
        assert sum(seeded) >= sum(c.charged for c in counted), (sum(seeded), counted)
        found = check_invariants(settings, sim, batch)
        assert progress.succeeded == 600, progress
        print(
            found.line(
                "redis-restart",
                finished_after_restart_s=round(recovered_s, 1),
                counted_at_crash=len(counted),
                seeded=len(seeded),
            )
        )
    finally:
        sim.stop()


def rebuilt_bucket(redis_url: str, bucket: str) -> list[int]:
    """The tokens of each call a worker logged when it rebuilt the lost ``bucket``.

    The first worker to use the bucket after the restart seeds it from the ledger and
    marks it initialised in the same script; the seeded entries are ``s.`` ones.
    """
    client = redis_client(redis_url)
    try:
        wait_until(
            lambda: bool(client.exists(throttle_total_key(bucket))), 60, "the bucket rebuilt"
        )
        return [tokens for _, tokens, member in entries(client, bucket) if member.startswith("s.")]
    finally:
        client.close()


@pytest.mark.timeout(400)
def test_redis_restarting_again_and_again(
    clean_db: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    # Each restart cuts the consumers mid-reconnection at a different point; kombu's
    # own transport crashed a consumer for good on some of them (jobs/broker.py).
    sim = Simulator(
        SimulatorConfig(key=TEST_KEY, rpm=RPM, tpm=TPM, latency_min=0.3, latency_max=1.5)
    ).start()
    try:
        settings = fault_settings(clean_db, private_redis.url, sim.url)
        with fleet(settings, tmp_path, concurrency=40) as f:
            f.start(2)
            batch = submit(settings, 2500, tag="redis-again")
            wait_until(lambda: sim.stats().ok >= 100, 60, "100 calls answered")
            for down_s in (0.0, 0.2, 1.0, 3.0, 0.5) * 2:
                private_redis.crash()
                time.sleep(down_s)
                private_redis.start()
                time.sleep(2)
            restarted = time.monotonic()
            logged = [len(w.log()) for w in f.workers]
            progress = wait_finished(batch, 240, f)
            recovered_s = time.monotonic() - restarted
            assert all(w.proc.poll() is None for w in f.workers), "no worker died"
            for worker, offset in zip(f.workers, logged, strict=True):
                assert "event=succeeded" in worker.log()[offset:], "every worker consumes again"
            assert "Unrecoverable error" not in f.logs()
        found = check_invariants(settings, sim, batch)
        assert progress.succeeded == 2500, progress
        print(found.line("redis-restarts-x10", finished_after_last_s=round(recovered_s, 1)))
    finally:
        sim.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A throw-away PostgreSQL cluster the test may stop and start: (var dir, database URL)."""
    var_dir = tmp_path / "pg"
    server = embedded.ensure_postgres(var_dir)
    url = create_database(server)
    migrate.upgrade(url)
    yield var_dir, url
    embedded.stop_all(var_dir, ("postgres",))


@pytest.mark.timeout(300)
def test_postgres_restart_and_a_20_s_outage_mid_batch(
    own_postgres: tuple[Path, str], redis_url: str, strict_sim: Simulator, tmp_path: Path
) -> None:
    var_dir, url = own_postgres
    # The production lease: a 20 s outage is shorter than it, so no job changes hands.
    settings = fault_settings(url, redis_url, strict_sim.url, job_lease_seconds=60.0)
    with fleet(settings, tmp_path, concurrency=40) as f:
        f.start(2)
        batch = submit(settings, 800, tag="pg")
        wait_until(lambda: strict_sim.stats().ok >= 100, 60, "100 calls answered")
        embedded.stop_all(var_dir, ("postgres",))  # a restart
        # Back on the same port: the workers' URL still points at it.
        assert make_url(embedded.ensure_postgres(var_dir)).port == make_url(url).port
        wait_until(lambda: strict_sim.stats().ok >= 300, 60, "300 calls answered")
        embedded.stop_all(var_dir, ("postgres",))
        time.sleep(20)  # an outage
        embedded.ensure_postgres(var_dir)
        back = time.monotonic()
        progress = wait_finished(batch, 200, f)
        recovered_s = time.monotonic() - back
        assert all(w.proc.poll() is None for w in f.workers), "no worker died"
        assert "event=outage" in f.logs()
    found = check_invariants(settings, strict_sim, batch)
    assert progress.succeeded == 800, progress
    print(found.line("postgres-outage", finished_after_return_s=round(recovered_s, 1)))
