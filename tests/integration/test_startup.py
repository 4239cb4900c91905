"""A worker or beat that starts while a service is away keeps trying, then says why in one line."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from devstack.procs import free_port, stop_process
from jobs.settings import Settings
from tests.support import ROOT, TcpProxy, settings_env, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("process", ["worker", "beat"])
def test_an_unreachable_database_is_retried_then_one_line(settings: Settings, process: str) -> None:
    port = free_port()
    env = settings_env(settings) | {
        "DATABASE_URL": f"postgresql://postgres:pw@127.0.0.1:{port}/batches",
        "SERVICE_WAIT_SECONDS": "6",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs", process],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    waited = time.monotonic() - started
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    message = f"cannot reach PostgreSQL at 127.0.0.1:{port}/batches (DATABASE_URL)"
    # One logfmt line per try, then the same error as one line.
    tries = [t for t in lines if t.startswith("event=service_wait ")]
    assert len(tries) >= 2, lines
    assert all(message in t and "gives_up_in_s=" in t for t in tries), tries
    assert lines[len(tries) :] == [f"batch-infer: error: {lines[-1].split(': error: ')[1]}"]
    assert message in lines[-1] and "pw" not in done.stderr
    assert waited >= 6, "it kept trying for SERVICE_WAIT_SECONDS"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("REDIS_URL", "http://127.0.0.1:6379"), ("INFERENCE_TPM_CHARGE", "sometimes")],
)
@pytest.mark.parametrize("process", ["worker", "beat"])
def test_a_bad_setting_stops_at_once_with_one_line(
    settings: Settings, process: str, variable: str, value: str
) -> None:
    env = settings_env(settings) | {variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "jobs", process],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("batch-infer: error: ")
    assert variable in done.stderr


def test_a_worker_started_during_an_outage_runs_once_the_database_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    assert settings.database_url is not None
    parsed = make_url(settings.database_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    through = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    proxy.cut()
    env = settings_env(settings) | {"DATABASE_URL": through, "SERVICE_WAIT_SECONDS": "60"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jobs", "worker", "--concurrency", "4"],
            env=env, cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        wait_until(lambda: "event=service_wait" in log_path.read_text(), 30, "a first retry")
        proxy.restore()
        wait_until(lambda: "event=worker_started" in log_path.read_text(), 60, "the worker")
        assert worker.poll() is None
    finally:
        stop_process(worker)
        proxy.close()


#: One logfmt pair: key=value, the value bare or double-quoted with escapes.
LOGFMT_LINE = re.compile(
    r'^[a-z_]+=(?:"(?:[^"\\]|\\.)*"|[^\s"]*)(?: [a-z_]+=(?:"(?:[^"\\]|\\.)*"|[^\s"]*))*$'
)


def test_on_a_dyno_every_line_is_logfmt_with_the_dyno_and_one_start_up_line(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(settings) | {
        "DYNO": "worker.7",
        "INFERENCE_RPM": "120",
        "INFERENCE_TPM": "800000",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jobs", "worker", "--concurrency", "5"],
            env=env, cwd=ROOT, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        wait_until(lambda: "celery@" in log_path.read_text(), 60, "the worker ready")
    finally:
        stop_process(worker)
    lines = log_path.read_text().splitlines()
    assert [t for t in lines if not LOGFMT_LINE.match(t)] == []
    assert [t for t in lines if not t.endswith(" dyno=worker.7")] == []
    assert any("Warm shutdown" in t for t in lines), "Celery's own notices too"
    started = [t for t in lines if t.startswith("event=worker_started ")]
    assert len(started) == 1
    assert (
        "model=kimi-k2-5 rpm=120 tpm=800000 attachments=INFERENCE pool_rpm=120 "
        'limits_from="INFERENCE_RPM,INFERENCE_TPM" '
        "tpm_charge=reserve "
        f"bucket={settings.bucket_name} concurrency=5 dispatch_window=200 "
        "dispatch_window_max=200 simulated=true "
        "dyno=worker.7"
    ) in started[0]
    assert settings.inference_key not in log_path.read_text()
