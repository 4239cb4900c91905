"""``python -m devstack demo``: the demo batch end to end, and with ``--pool 2`` through
two simulators as two attachments of a pool."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.procs import ROOT
from tests.support import scrubbed_env

pytestmark = pytest.mark.integration


def demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack", "demo", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_demo_runs_through_a_pool_of_two_simulators(
    clean_db: str, redis_url: str, tmp_path: Path
) -> None:
    env = scrubbed_env() | {
        "DATABASE_URL": clean_db,
        "REDIS_URL": redis_url,
        "VAR_DIR": str(tmp_path / "var"),
    }
    done = demo(env, "--requests", "40", "--pool", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "INFERENCE_2 at http://127.0.0.1:" in out and "SIMULATED" in out
    assert "limit 300 requests/min over 2 keys" in out
    assert "batch 1: 40 succeeded, 0 failed, 0 cancelled of 40" in out
    found = re.search(r"calls by attachment: INFERENCE (\d+), INFERENCE_2 (\d+)", out)
    assert found is not None, out
    first, second = int(found[1]), int(found[2])
    assert first + second == 40 and first > 0 and second > 0
    assert "stopped the embedded services this demo started: ['simulator']" in out


def test_a_pool_of_simulators_needs_the_simulator(clean_db: str, redis_url: str) -> None:
    env = scrubbed_env() | {
        "DATABASE_URL": clean_db,
        "REDIS_URL": redis_url,
        "INFERENCE_URL": "https://inference.example",
        "INFERENCE_KEY": "k",
    }
    done = demo(env, "--pool", "2")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "devstack: error: --pool runs simulators as the attachments: with INFERENCE_URL or "
        "INFERENCE_POOL set, the pool is yours already (unset them, or drop --pool)\n"
    )
