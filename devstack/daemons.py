"""Long-lived local daemons: pid files, ports, locks and logs under a var directory.

The embedded PostgreSQL and Redis (:mod:`devstack.embedded`) and the bundled
simulator (:mod:`devstack.services`) all run as daemons that outlive the process
that started them. Other processes find them again through small files in the
var directory, so everything here is about reading those files safely, telling
a live daemon from a recycled pid, picking ports, and serialising starts and
stops with one lock per var directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.settings import Settings

log = logging.getLogger(__name__)

#: Name of the lock file in the var directory.
LOCK_FILE = ".lock"
#: Longest wait for another process holding the var directory lock (a first
#: initdb plus start takes a few seconds; a stuck holder should not hang us forever).
LOCK_TIMEOUT = 180.0
#: Lines of a server log quoted in error messages.
LOG_TAIL_LINES = 25


#: Per-user data directory when the dev stack is not run from a source checkout.
USER_DATA_DIR = "batch-infer"


def default_var_dir() -> Path:
    """Where the dev stack keeps its servers' data when VAR_DIR is unset.

    The project root's ``var/`` when this package sits in a source checkout (next to
    ``pyproject.toml``), so every command of the checkout shares it from any current
    directory; otherwise ``$XDG_DATA_HOME/batch-infer`` (``~/.local/share/batch-infer``).
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return root / "var"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / USER_DATA_DIR


def var_dir_of(settings: Settings) -> Path:
    """VAR_DIR if set, else :func:`default_var_dir`, as an absolute path."""
    return (settings.var_dir or default_var_dir()).expanduser().resolve()


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or stopped; the message says why."""


@contextmanager
def locked(var_dir: Path) -> Iterator[None]:
    """Hold ``var_dir``'s exclusive lock (across processes), the one every start and stop takes."""
    root = Path(var_dir).expanduser().resolve()
    lock = root / LOCK_FILE
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"another process has held {lock} for over {LOCK_TIMEOUT:.0f} s "
                        "while starting or stopping the embedded servers"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        # Closing the descriptor releases the lock, even after an exception.
        os.close(fd)


def pid_alive(pid: int, name: str | None = None) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone), named ``name`` if given."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # Without /proc (not Linux) kill() is all we know; with it, the process just vanished.
        return not Path("/proc/self/stat").exists()
    # Format: "pid (comm) state ...", where comm itself may contain parentheses.
    comm = raw[raw.find("(") + 1 : raw.rfind(")")]
    state = raw[raw.rfind(")") + 1 :].split()[:1]
    return state != ["Z"] and (name is None or comm == name)


def runs_in(pid: int, directory: Path) -> bool:
    """Whether ``pid``'s working directory is ``directory`` (where a daemon chdir'ed).

    Guards every signal sent on the strength of a pid file: after a reboot the
    recorded pid may belong to an unrelated server of the same name. Where
    /proc is missing the check cannot be made and passes.
    """
    if not Path("/proc/self/cwd").exists():
        return True
    try:
        return os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == os.path.realpath(directory)
    except OSError:
        return False


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll ``done`` until it holds (``True``) or ``timeout`` seconds pass (``False``)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone (see :func:`pid_alive`); ``False`` if it outlived ``timeout``."""
    return wait_until(lambda: not pid_alive(pid), timeout)


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the servers set, so a TIME_WAIT leftover does not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def read_int(path: Path) -> int | None:
    """The integer a pid or port file holds, or ``None`` when missing or unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically, so a concurrent reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def choose_port(port_file: Path) -> int:
    """The recorded port when it is still free, else a new free one (then recorded)."""
    recorded = read_int(port_file)
    if recorded is not None and 0 < recorded < 65536 and port_free(recorded):
        return recorded
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    if recorded is not None:
        log.info("port %d in %s is taken; using %d", recorded, port_file.name, port)
    _write_text(port_file, f"{port}\n")
    return port


def tcp_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a server log, labelled for quoting in an error message."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16_384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"last lines of {path}:\n{tail}" if tail else f"({path} is empty)"


def read_from(path: Path, offset: int) -> str:
    """What a log file gained after byte ``offset``; empty when it cannot be read."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_command(
    cmd: list[str],
    *,
    what: str,
    cwd: Path,
    timeout: float,
    env: dict[str, str],
    user: pwd.struct_passwd | None = None,
    log_file: Path | None = None,
) -> str:
    """Run a short-lived command to completion and return its output.

    Output goes to temporary files rather than pipes: a daemon forked by the
    command could otherwise inherit the pipe and keep the read open forever.
    On failure the error carries the command's output and the log's tail.

    ``env`` is the command's whole environment; ``user``, when given, is the
    account the command runs as.
    """
    extra: dict[str, Any] = {}
    if user is not None:
        extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile() as out:
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                timeout=timeout,
                check=False,
                **extra,
            )
            failure = None if result.returncode == 0 else f"exited with {result.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"did not finish within {timeout:.0f} s"
        except OSError as exc:
            raise EmbeddedError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
        out.seek(0)
        output = out.read().decode("utf-8", "replace").strip()
    if failure is not None:
        message = f"{what} failed: {Path(cmd[0]).name} {failure}"
        if output:
            message += f"\n{output}"
        if log_file is not None:
            message += f"\n{log_tail(log_file)}"
        raise EmbeddedError(message)
    return output
