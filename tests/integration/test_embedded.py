"""Real embedded PostgreSQL and Redis started under temporary var directories."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg
import pytest
import redis
import sqlalchemy

from devstack import embedded
from jobs.settings import Settings

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_NAMES = ("postgres", "redis-server")


def server_processes(var_dir: Path) -> list[psutil.Process]:
    """Live postgres / redis-server processes belonging to ``var_dir``.

    Both servers chdir into their directory under var_dir, and PostgreSQL's
    children rewrite their command line, so the working directory is the
    reliable mark; the command line catches a process that has not chdir'ed yet.
    """
    root = str(var_dir.resolve())
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["name"] not in SERVER_NAMES or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            cwd = proc.cwd()
        except psutil.Error:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cwd == root or cwd.startswith(root + os.sep) or root in cmdline:
            found.append(proc)
    return found


def postmasters(var_dir: Path) -> list[psutil.Process]:
    pgdata = str((var_dir / "postgres").resolve())
    return [
        p
        for p in server_processes(var_dir)
        if p.info["name"] == "postgres" and pgdata in (p.info["cmdline"] or [])
    ]


def postmaster_pid(var_dir: Path) -> int:
    return int((var_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])


def psycopg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``python -c code args...`` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"child failed:\n{err}"
    return out.strip()


@pytest.fixture
def make_var_dir(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Hands out var directories under tmp_path and stops their servers afterwards."""
    made: list[Path] = []

    def make(name: str = "var") -> Path:
        path = tmp_path / name
        made.append(path)
        return path

    yield make
    for path in made:
        try:
            embedded.stop_all(path)
        finally:
            # Last resort when a clean stop failed: never leak a server.
            for proc in server_processes(path):
                proc.kill()


@pytest.fixture
def var_dir(make_var_dir: Callable[[str], Path]) -> Path:
    return make_var_dir("var")


def test_postgres_starts_once_and_is_shared_across_processes(var_dir: Path) -> None:
    url = embedded.ensure_postgres(var_dir)
    assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert url.endswith("/postgres")
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert (var_dir / "postgres.port").read_text().strip() == port

    with psycopg.connect(psycopg_conninfo(url)) as conn:
        version = conn.execute("SELECT version()").fetchone()
        settings = conn.execute(
            "SELECT current_setting('max_connections'), current_setting('fsync')"
        ).fetchone()
    assert version is not None
    assert "PostgreSQL 18" in version[0]
    assert settings == ("200", "on")

    # The URL works as given with SQLAlchemy and psycopg 3.
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 41 + 1")).scalar_one() == 42
    finally:
        engine.dispose()

    pid = postmaster_pid(var_dir)
    assert embedded.ensure_postgres(var_dir) == url
    code = "import sys; from pathlib import Path; from devstack.embedded import ensure_postgres; "
    code += "print(ensure_postgres(Path(sys.argv[1])))"
    assert finish(run_python(code, str(var_dir))) == url
    assert postmaster_pid(var_dir) == pid
    assert [p.pid for p in postmasters(var_dir)] == [pid]
    assert embedded.running(var_dir) == {"postgres": url}


def test_concurrent_processes_resolve_to_the_same_servers(var_dir: Path) -> None:
    # A CLI and three workers starting at once with no DATABASE_URL / REDIS_URL.
    code = (
        "import sys; from pathlib import Path; from devstack.embedded import resolve; "
        "from jobs.settings import Settings; "
        "s = resolve(Settings(var_dir=Path(sys.argv[1]))); print(s.database_url, s.redis_url)"
    )
    children = [run_python(code, str(var_dir)) for _ in range(4)]
    outputs = {finish(child) for child in children}
    assert len(outputs) == 1
    database_url, redis_url = outputs.pop().split()
    assert embedded.running(var_dir) == {"postgres": database_url, "redis": redis_url}
    assert len(postmasters(var_dir)) == 1
    names = [p.info["name"] for p in server_processes(var_dir)]
    assert names.count("redis-server") == 1


def test_redis_serves_commands_and_lua_time(var_dir: Path) -> None:
    url = embedded.ensure_redis(var_dir)
    assert url.startswith("redis://127.0.0.1:")
    assert url.endswith("/0")
    client = redis.Redis.from_url(url)
    try:
        assert client.ping() is True
        client.set("embedded-test", "value")
        assert client.get("embedded-test") == b"value"
        seconds, micros = client.eval("return redis.call('TIME')", 0)
        assert int(seconds) > 1_700_000_000
        assert 0 <= int(micros) < 1_000_000
        assert client.info("server")["redis_version"].startswith("6.2")
        # Nothing is persisted: the embedded Redis is a cache and a queue.
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()
    assert embedded.ensure_redis(var_dir) == url
    assert embedded.running(var_dir) == {"redis": url}


def test_stop_all_stops_both_and_a_restart_reuses_the_ports(var_dir: Path) -> None:
    pg_url = embedded.ensure_postgres(var_dir)
    redis_url = embedded.ensure_redis(var_dir)
    pids = [p.pid for p in server_processes(var_dir)]
    assert len(pids) >= 2

    assert sorted(embedded.stop_all(var_dir)) == ["postgres", "redis"]
    assert embedded.running(var_dir) == {}
    assert server_processes(var_dir) == []
    assert all(gone(pid) for pid in pids)
    assert not (var_dir / "postgres" / "postmaster.pid").exists()
    assert embedded.stop_all(var_dir) == []

    assert embedded.ensure_postgres(var_dir) == pg_url
    assert embedded.ensure_redis(var_dir) == redis_url
    assert sorted(embedded.stop_all(var_dir)) == ["postgres", "redis"]
    assert server_processes(var_dir) == []


def test_a_recorded_port_taken_by_another_program_is_replaced(var_dir: Path) -> None:
    old_pg = embedded.ensure_postgres(var_dir)
    old_redis = embedded.ensure_redis(var_dir)
    embedded.stop_all(var_dir)
    squatters = []
    try:
        for name in ("postgres.port", "redis.port"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            squatters.append(sock)
            # As servers do, so TIME_WAIT leftovers of earlier clients do not block it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", int((var_dir / name).read_text())))
            sock.listen()
        new_pg = embedded.ensure_postgres(var_dir)
        new_redis = embedded.ensure_redis(var_dir)
    finally:
        for sock in squatters:
            sock.close()
    assert new_pg != old_pg
    assert new_redis != old_redis
    assert embedded.running(var_dir) == {"postgres": new_pg, "redis": new_redis}
    assert new_pg.endswith(f":{(var_dir / 'postgres.port').read_text().strip()}/postgres")
    assert new_redis.endswith(f":{(var_dir / 'redis.port').read_text().strip()}/0")


def test_stop_all_on_a_missing_directory_does_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never-created"
    assert embedded.stop_all(missing) == []
    assert embedded.running(missing) == {}
    assert not missing.exists()


def test_resolve_leaves_explicit_urls_untouched(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql+psycopg://app@db.example.com:5432/app",
        redis_url="rediss://cache.example.com:6380/0",
        var_dir=tmp_path / "var",
    )
    assert embedded.resolve(settings) is settings
    assert not (tmp_path / "var").exists()


def test_resolve_fills_only_the_missing_url(var_dir: Path) -> None:
    explicit_db = "postgresql+psycopg://app@db.example.com:5432/app"
    resolved = embedded.resolve(Settings(database_url=explicit_db, var_dir=var_dir))
    assert resolved.database_url == explicit_db
    assert resolved.redis_url == embedded.running(var_dir)["redis"]
    assert "postgres" not in embedded.running(var_dir)
    assert not (var_dir / "postgres").exists()


def test_long_var_dir_puts_the_socket_in_a_short_directory(
    make_var_dir: Callable[[str], Path],
) -> None:
    var_dir = make_var_dir("a-rather-long-directory-name-" + "x" * 80 + "/var")
    url = embedded.ensure_postgres(var_dir)
    socket_dir = Path((var_dir / "postgres" / "postmaster.pid").read_text().splitlines()[4])
    port = url.rsplit(":", 1)[1].split("/")[0]
    socket_path = socket_dir / f".s.PGSQL.{port}"
    assert socket_path.is_socket()
    assert len(str(socket_path)) <= 107
    assert not socket_dir.is_relative_to(var_dir)
    with psycopg.connect(host=str(socket_dir), port=port, user="postgres") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert embedded.stop_all(var_dir) == ["postgres"]
    assert not socket_dir.exists()


def test_start_failure_quotes_the_server_log(var_dir: Path) -> None:
    embedded.ensure_postgres(var_dir)
    embedded.stop_all(var_dir)
    with (var_dir / "postgres" / "postgresql.conf").open("a") as conf:
        conf.write("this line is not valid\n")
    with pytest.raises(embedded.EmbeddedError) as failure:
        embedded.ensure_postgres(var_dir)
    message = str(failure.value)
    assert "starting PostgreSQL" in message
    assert "postgres.log" in message
    assert "postgresql.conf" in message
    assert embedded.running(var_dir) == {}
    assert server_processes(var_dir) == []
