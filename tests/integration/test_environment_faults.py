"""Every fault of the environment gives one line, exit status 2 and nothing written.

A catalogue of (command x fault). The commands run in-process through
``jobs.cli.main``, the same path as ``python -m jobs`` after argument parsing; the
services are real, and an unreachable one is a refused port on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from devstack.procs import free_port
from jobs import cli, migrate
from jobs.settings import Settings
from tests.support import (
    ROOT,
    create_database,
    drop_database,
    jsonl,
    line,
    settings_env,
)

pytestmark = pytest.mark.integration

#: Commands as a user types them; BATCH and FILE are filled in per test.
COMMANDS = {
    "submit": ["submit", "FILE"],
    "status": ["status", "BATCH"],
    "results": ["results", "BATCH"],
    "usage": ["usage"],
    "cancel": ["cancel", "BATCH"],
    "retry": ["retry", "BATCH"],
    "purge": ["purge", "--older-than-days", "1"],
}
#: Commands that use Redis; the others need only the database.
USES_REDIS = {"submit", "cancel", "retry"}
PASSWORD = "s3cret-pw"
Run = Callable[[dict[str, str], str], tuple[int, str, str]]


def _counts(database_url: str) -> tuple[int, int] | None:
    """(batches, jobs) in the database, or None when it has no schema."""
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        exists = conn.execute("SELECT to_regclass('public.batches') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM jobs)")
        batches, jobs = row.fetchone() or (0, 0)
        return int(batches), int(jobs)


def _tables(database_url: str) -> list[str]:
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
    return [str(r[0]) for r in rows]


@pytest.fixture
def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Iterator[Run]:
    """``run(env, command) -> (status, stdout, stderr)`` in-process, in exactly ``env``."""
    batch_file = tmp_path / "requests.jsonl"
    batch_file.write_bytes(jsonl(line("a"), line("b")))

    def _run(env: dict[str, str], command: str) -> tuple[int, str, str]:
        for name in list(os.environ):
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        argv = [
            str(batch_file) if a == "FILE" else "1" if a == "BATCH" else a
            for a in COMMANDS[command]
        ]
        capsys.readouterr()
        status = cli.main(argv)
        out, err = capsys.readouterr()
        return status, out, err

    yield _run


def _assert_one_line(result: tuple[int, str, str], *needles: str) -> str:
    status, out, err = result
    assert status == 2, err
    assert out == ""
    assert err.startswith("batch-infer: error: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err
    assert PASSWORD not in err
    return err


@pytest.fixture
def empty_database(base_settings: Settings) -> Iterator[str]:
    assert base_settings.database_url is not None
    url = create_database(base_settings.database_url, prefix="bi_noschema")
    yield url
    drop_database(url)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_database_without_schema_says_to_migrate(
    run: Run, settings: Settings, empty_database: str, command: str
) -> None:
    env = settings_env(settings.replace(database_url=empty_database))
    _assert_one_line(run(env, command), "no schema yet", "python -m jobs migrate")
    assert _tables(empty_database) == []


@pytest.mark.parametrize("command", ["submit", "status", "usage"])
def test_an_older_schema_says_to_migrate(
    run: Run, settings: Settings, empty_database: str, command: str
) -> None:
    migrate.upgrade(empty_database, "0001")
    env = settings_env(settings.replace(database_url=empty_database))
    _assert_one_line(
        run(env, command),
        "schema is at revision 0001",
        f"needs {migrate.head_revision()}",
        "python -m jobs migrate",
    )
    assert _counts(empty_database) == (0, 0)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unreachable_database_is_named_without_its_password(
    run: Run, settings: Settings, command: str
) -> None:
    port = free_port()
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}/batches"
    env = settings_env(settings) | {"DATABASE_URL": url}
    _assert_one_line(
        run(env, command),
        f"cannot reach PostgreSQL at 127.0.0.1:{port}/batches (DATABASE_URL)",
    )


@pytest.mark.parametrize("command", sorted(USES_REDIS))
def test_an_unreachable_redis_is_named_and_nothing_is_stored(
    run: Run, settings: Settings, command: str
) -> None:
    assert settings.database_url is not None
    port = free_port()
    env = settings_env(settings) | {"REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"}
    _assert_one_line(run(env, command), f"cannot reach Redis at 127.0.0.1:{port} (REDIS_URL)")
    assert _counts(settings.database_url) == (0, 0)


def test_tls_to_a_plain_redis_is_one_line(run: Run, settings: Settings) -> None:
    assert settings.database_url is not None and settings.redis_url is not None
    plain = settings.redis_url.replace("redis://", "rediss://", 1)
    env = settings_env(settings) | {"REDIS_URL": plain}
    _assert_one_line(run(env, "submit"), "TLS with Redis at", "(REDIS_URL)")
    assert _counts(settings.database_url) == (0, 0)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DATABASE_URL", f"mysql://root:{PASSWORD}@db/x", "DATABASE_URL must be a postgres://"),
        ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL must be a redis:// or rediss:// URL"),
        ("INFERENCE_URL", "http://inference.example.com", "INFERENCE_URL must be https://"),
    ],
    ids=["database", "redis", "inference"],
)
@pytest.mark.parametrize("command", ["submit", "status", "usage"])
def test_a_url_with_a_wrong_scheme_is_named(
    run: Run, settings: Settings, command: str, variable: str, value: str, message: str
) -> None:
    assert settings.database_url is not None
    env = settings_env(settings) | {variable: value}
    _assert_one_line(run(env, command), message)
    assert _counts(settings.database_url) == (0, 0)


def test_an_output_path_that_cannot_be_written_is_one_line(
    run: Run, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = settings_env(settings)
    status, _, err = run(env, "submit")
    assert status == 0, err
    target = tmp_path / "missing-dir" / "x.jsonl"
    monkeypatch.setitem(COMMANDS, "results", ["results", "BATCH", "-o", str(target)])
    _assert_one_line(run(env, "results"), f"cannot write {target}: No such file or directory")
    assert not target.parent.exists()


def test_a_closed_pipe_ends_quietly(settings: Settings) -> None:
    """``results N | head -1`` on a batch far larger than a pipe's buffer."""
    env = settings_env(settings)
    count = 3000
    batch_file = ROOT / ".pytest-pipe.jsonl"
    try:
        batch_file.write_bytes(jsonl(*(line(f"r{i}") for i in range(count))))
        submit = subprocess.run(
            [sys.executable, "-m", "jobs", "submit", str(batch_file)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        batch_file.unlink(missing_ok=True)
    assert submit.returncode == 0, submit.stderr
    cancel = subprocess.run(
        [sys.executable, "-m", "jobs", "cancel", "1"],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert cancel.stdout == f"batch 1: stopped {count} jobs not yet sent; cancelled\n", (
        cancel.stderr
    )
    piped = subprocess.run(
        f"{sys.executable} -m jobs results 1 --errors | head -1",
        shell=True, env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert piped.stderr == ""
    assert piped.stdout.count("\n") == 1 and '"custom_id":"r0"' in piped.stdout
    status = subprocess.run(
        f"set -o pipefail; {sys.executable} -m jobs results 1 --errors | head -1 >/dev/null",
        shell=True, executable="/bin/bash", env=env, cwd=ROOT, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert (status.returncode, status.stderr) == (0, "")
