"""Fixtures of the fault suite: a strict simulator with latency, and settings for worker fleets.

Leases are short (JOB_LEASE_SECONDS=6) so that a killed worker's jobs come back
within seconds; production's default is 60 s and the recovery times scale with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.simulator import Simulator, SimulatorConfig
from jobs.settings import Settings
from tests.faults.harness import PrivateRedis
from tests.support import TEST_KEY, make_settings

#: Limits of the suite's simulator and throttle: high enough for a 1,000-job batch
#: to finish in a minute on two cores, enforced on both sides all the same.
RPM = 3000
TPM = 3_000_000
LEASE_S = 6.0


def fault_settings(
    database_url: str, redis_url: str, inference_url: str, **extra: object
) -> Settings:
    values: dict[str, object] = {
        "rpm": RPM,
        "tpm": TPM,
        "read_timeout": 5.0,
        "job_lease_seconds": LEASE_S,
        "dispatch_window": 200,
        "max_attempts": 8,
        "backoff_base": 0.5,
        "backoff_max": 5.0,
        "auth_retry_s": 2.0,
        "window_margin_s": 1.0,
        # The window of 200 drains in 4 s at these limits (production: 160 s).
        "dispatch_redeliver_after": 15.0,
    }
    return make_settings(database_url, redis_url, inference_url, **(values | extra))


@pytest.fixture
def strict_sim() -> Iterator[Simulator]:
    """The provider: a strict sliding window at the suite's limits, 0.3-1.5 s per call."""
    sim = Simulator(
        SimulatorConfig(key=TEST_KEY, rpm=RPM, tpm=TPM, latency_min=0.3, latency_max=1.5, seed=7)
    ).start()
    yield sim
    sim.stop()


@pytest.fixture
def fleet_settings(clean_db: str, redis_url: str, strict_sim: Simulator) -> Settings:
    return fault_settings(clean_db, redis_url, strict_sim.url)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
