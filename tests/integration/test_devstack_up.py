"""``make up``: migrate, then the Procfile's long-running processes under honcho."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.__main__ import long_running
from jobs.settings import Settings
from tests.support import ROOT, settings_env, wait_until

pytestmark = pytest.mark.integration


def test_the_procfile_s_long_running_processes_are_all_but_release() -> None:
    assert long_running(ROOT / "Procfile") == ["worker", "beat", "web"]


def test_up_runs_worker_and_beat_until_interrupted(settings: Settings, tmp_path: Path) -> None:
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "devstack", "up"],
            env=settings_env(settings), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(
            lambda: (
                "worker.1 | event=worker_started" in log_path.read_text()
                and "beat.1   | level=info logger=celery.beat" in log_path.read_text()
            ),
            60,
            "worker and beat running under honcho",
        )
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    text = log_path.read_text()
    assert "worker.1 stopped" in text and "beat.1 stopped" in text, text
