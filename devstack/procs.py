"""Child processes of the dev stack, the tests and the bench: one way to start and stop them.

* :func:`free_port`: a loopback port nothing listens on;
* :func:`stop_process`: SIGTERM, a grace period, then SIGKILL;
* :class:`WorkerProcess`: a real Celery worker in its own OS process, as on a dyno, started
  with the CLI's own command line (:func:`jobs.environment.worker_argv`) unless told
  otherwise, its output in a log file;
* :class:`WebProcess`: ``python -m web`` on a port of its own, as the Procfile runs it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

#: The project root: child processes start there, so ``-m worker.app`` and friends resolve.
ROOT = Path(__file__).resolve().parent.parent
#: Seconds a worker gets to finish calls in flight after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT = 45.0
#: What Celery logs once a worker consumes.
READY_MARK = "ready."


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class WorkerProcess:
    """A Celery worker in its own OS process, its stdout and stderr in ``log_path``."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], log_path: Path, *, append: bool = False
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab" if append else "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=dict(env), cwd=ROOT, stdout=self._log, stderr=self._log,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until Celery says it consumes; raise with the log if it exits or stalls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"a worker exited at start:\n{self.log()[-4000:]}")
            if READY_MARK in self.log():
                return
            time.sleep(0.2)
        raise RuntimeError(f"a worker was not ready after {timeout:.0f} s; see {self.log_path}")

    def signal_stop(self) -> None:
        """SIGTERM (Celery's warm shutdown, as Heroku sends it), without waiting."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
        code = stop_process(self.proc, timeout)
        self._log.close()
        return code


class WebProcess(WorkerProcess):
    """``python -m web`` serving on ``port`` (its output in ``log_path``)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "web"], dict(env) | {"PORT": str(self.port)}, log_path
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until ``/health`` answers; raise with the log if it exits or stalls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the web process exited at start:\n{self.log()[-4000:]}")
            try:
                health = f"{self.url}/health"  # http on loopback, built here
                with urllib.request.urlopen(health, timeout=2) as reply:  # noqa: S310
                    if reply.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the web process was not ready after {timeout:.0f} s")
