"""``make up``: migrate, then the Procfile's long-running processes under honcho."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devstack.__main__ import long_running
from devstack.procs import free_port
from jobs.settings import Settings
from tests.support import ROOT, WEB_KEY, settings_env, wait_until

pytestmark = pytest.mark.integration


def test_the_procfile_s_long_running_processes_are_all_but_release() -> None:
    assert long_running(ROOT / "Procfile") == ["worker", "beat", "web"]


def test_up_runs_the_procfile_and_serves_the_dashboard_until_interrupted(
    settings: Settings, tmp_path: Path
) -> None:
    log_path = tmp_path / "up.log"
    port = free_port()
    env = settings_env(settings) | {"PORT": str(port), "API_KEYS": WEB_KEY}
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "devstack", "up"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(
            lambda: (
                "worker.1 | event=worker_started" in log_path.read_text()
                and "beat.1   | level=info logger=celery.beat" in log_path.read_text()
                and f"web.1    | event=web_started port={port}" in log_path.read_text()
            ),
            60,
            "worker, beat and web running under honcho",
        )
        reply = httpx.get(f"http://127.0.0.1:{port}/v1/batches", auth=("me", WEB_KEY))
        assert reply.status_code == 200, reply.text
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    text = log_path.read_text()
    assert f"dashboard: http://127.0.0.1:{port}/ (any user name; password: {WEB_KEY})" in text
    for name in ("worker.1", "beat.1", "web.1"):
        assert f"{name} stopped" in text, text
