"""On a dyno, a missing config var stops every process with one line; nothing is started.

Heroku sets ``DYNO`` on every dyno. There a missing add-on (or one attached under
another name) must stop the worker, beat, the release phase and a one-off command at
once, instead of running on an embedded database and a simulator nobody sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from jobs.environment import PROVIDERS
from jobs.settings import Settings
from tests.support import ROOT, settings_env

pytestmark = pytest.mark.integration

#: The Procfile's processes and a one-off command, as Heroku runs them.
PROCESSES = {
    "worker": ["-m", "jobs", "worker"],
    "beat": ["-m", "jobs", "beat"],
    "release": ["-m", "jobs", "migrate"],
    "run": ["-m", "jobs", "status", "1"],
    "celery": ["-m", "celery", "-A", "worker.app", "worker"],
    "web": ["-m", "web"],
}
REQUIRED = ("DATABASE_URL", "REDIS_URL", "INFERENCE_URL", "INFERENCE_KEY")


def _dev_stack_pids(var_dir: Path) -> set[int]:
    """Processes the dev stack would start: the simulator, and servers under ``var_dir``."""
    fragments = ("devstack.simulator", str(var_dir))
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if any(fragment in cmdline for fragment in fragments):
            found.add(int(proc.info["pid"]))
    return found


def _rows(database_url: str) -> tuple[int, int, int]:
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM jobs), "
            "(SELECT count(*) FROM attempts)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.parametrize("missing", REQUIRED)
@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_a_missing_variable_stops_the_process_with_one_line(
    settings: Settings, redis_conn: redis.Redis, tmp_path: Path, process: str, missing: str
) -> None:
    assert settings.database_url is not None
    var_dir = tmp_path / "var"
    env = settings_env(settings) | {"DYNO": f"{process}.1", "VAR_DIR": str(var_dir)}
    env["API_KEYS"] = "a-web-key"
    del env[missing]
    before = _dev_stack_pids(var_dir)
    done = subprocess.run(
        [sys.executable, *PROCESSES[process]],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        f"batch-infer: error: {missing} is not set on dyno {process}.1: {PROVIDERS[missing]} "
        "(or set it with `heroku config:set` if the add-on is attached under another name)\n"
    )
    assert not var_dir.exists()
    assert _dev_stack_pids(var_dir) - before == set()
    assert _rows(settings.database_url) == (0, 0, 0)
    assert redis_conn.dbsize() == 0


def test_the_web_process_on_a_dyno_needs_api_keys(settings: Settings, tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    env = settings_env(settings) | {"DYNO": "web.1", "VAR_DIR": str(var_dir), "PORT": "0"}
    env.pop("API_KEYS", None)
    done = subprocess.run(
        [sys.executable, "-m", "web"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr
        == f"batch-infer: error: API_KEYS is not set on dyno web.1: {PROVIDERS['API_KEYS']}\n"
    )
    assert not var_dir.exists(), "no local key is made on a dyno"
