"""The whole path: API or CLI, Postgres, dispatcher, Celery on Redis, a worker
process, the simulator over HTTP, and back to results and usage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy import text as text_sql

from devstack.simulator import Simulator
from jobs import api
from jobs.connections import redis_client
from jobs.db import session_scope
from jobs.models import Attempt
from jobs.settings import Settings
from tests.support import WorkerProcess, run_cli, settings_env

pytestmark = pytest.mark.integration


def batch_lines(n: int) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"e2e-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "kimi-k2-5",
                "messages": [{"role": "user", "content": f"Tell me about {i}"}],
                "max_tokens": 40,
            },
        }
        for i in range(n)
    ]


def test_batch_and_enqueue_through_a_worker_process(
    settings: Settings, simulator: Simulator, worker_process: WorkerProcess
) -> None:
    assert settings.database_url
    batch = api.submit_batch(batch_lines(40), name="e2e", settings=settings)
    job = api.enqueue([{"role": "user", "content": "interactive"}], settings=settings)
    assert job.wait(timeout=60) == "succeeded"
    assert job.result().output_text
    progress = batch.wait(timeout=90)
    assert (progress.status, progress.succeeded, progress.failed) == ("completed", 40, 0)
    results = list(batch.results())
    assert sorted(r["custom_id"] for r in results) == sorted(f"e2e-{i}" for i in range(40))
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)
    stats = simulator.stats()
    with session_scope(settings.database_url) as s:
        calls, tokens = s.execute(select(func.count(), func.sum(Attempt.total_tokens))).one()
    assert (calls, tokens) == (stats.calls, stats.total_tokens)
    assert stats.duplicate_bodies == 0
    log = worker_process.log()
    assert "event=succeeded" in log and "event=attempt" in log
    assert_key_nowhere(settings, log)


def assert_key_nowhere(settings: Settings, *texts: str) -> None:
    """The key is in no log text, no database row and no Redis key or value."""
    key = settings.inference_key
    assert key and settings.database_url and settings.redis_url
    for text in texts:
        assert key not in text
    with session_scope(settings.database_url) as s:
        for table in ("batches", "jobs", "attempts"):
            rows = s.execute(text_sql(f"SELECT t::text FROM {table} t")).scalars().all()
            assert rows and not any(key in row for row in rows), table
    client = redis_client(settings.redis_url)
    try:
        keys = client.keys("*")
        assert keys
        for name in keys:
            assert key.encode() not in name
            kind = client.type(name)
            if kind == b"string":
                values = [client.get(name) or b""]
            elif kind == b"list":
                values = client.lrange(name, 0, -1)
            elif kind == b"hash":
                values = list(client.hgetall(name).values())
            elif kind == b"zset":
                values = client.zrange(name, 0, -1)
            elif kind == b"set":
                values = list(client.smembers(name))
            else:
                values = []
            assert not any(key.encode() in v for v in values), name
    finally:
        client.close()


def test_cli_submit_wait_status_results_usage(
    settings: Settings, simulator: Simulator, worker_process: WorkerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "cli.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in batch_lines(12)) + "\n")
    done = run_cli(settings, "submit", str(path), "--name", "from-cli", "--wait")
    assert done.returncode == 0, done.stderr
    batch_id = int(done.stdout.split()[1])
    assert "12/12" in done.stderr or "12/12" in done.stdout

    status = run_cli(settings, "status", str(batch_id), "--json")
    assert json.loads(status.stdout)["succeeded"] == 12

    out = tmp_path / "out.jsonl"
    results = run_cli(settings, "results", str(batch_id), "-o", str(out))
    assert results.returncode == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 12 and all(x["response"]["status_code"] == 200 for x in lines)

    usage = run_cli(settings, "usage", "--batch", str(batch_id), "--json")
    rows = json.loads(usage.stdout)
    # Exactly what the provider counted: its calls, and its tokens to the last one.
    stats = simulator.stats()
    figures = ("calls", "ok_calls", "prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: sum(r[k] for r in rows) for k in figures} == {
        "calls": 12,
        "ok_calls": 12,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.total_tokens,
    }
    assert (stats.calls, stats.ok) == (12, 12)

    # Without a price, tokens only, and the variables that would add dollars; with one,
    # dollars from the ledger's tokens, in usage and status alike.
    assert all(r["usd"] is None for r in rows)
    text = run_cli(settings, "usage", "--batch", str(batch_id)).stdout
    assert "kimi-k2-5: no price: set INFERENCE_PRICE_INPUT and INFERENCE_PRICE_OUTPUT" in text
    status_text = run_cli(settings, "status", str(batch_id)).stdout
    tokens = f"{stats.prompt_tokens:,} prompt + {stats.completion_tokens:,} completion tokens"
    assert f"usage: {tokens} (no price: set INFERENCE_PRICE_INPUT" in status_text
    priced = settings_env(settings) | {
        "INFERENCE_PRICE_INPUT": "0.6",
        "INFERENCE_PRICE_OUTPUT": "3",
    }
    usd = (stats.prompt_tokens * 0.6 + stats.completion_tokens * 3) / 1e6
    rows = json.loads(
        run_cli(settings, "usage", "--batch", str(batch_id), "--json", env=priced).stdout
    )
    assert sum(r["usd"] for r in rows) == pytest.approx(usd)
    text = run_cli(settings, "usage", "--batch", str(batch_id), env=priced).stdout
    assert text.splitlines()[-1].endswith(f" {stats.total_tokens} tokens, ${usd:,.4f}")
    priced_text = run_cli(settings, "status", str(batch_id), env=priced).stdout
    assert f"usage: {tokens}, ${usd:,.4f}\n" in priced_text
    status = run_cli(settings, "status", str(batch_id), "--json", env=priced)
    assert json.loads(status.stdout)["usage_usd"] == pytest.approx(usd)
    assert_key_nowhere(
        settings, *(p.stdout + p.stderr for p in (done, status, results, usage)),
        out.read_text(), worker_process.log(),
    )  # fmt: skip

    # cancel and retry on a finished batch: nothing to do, said plainly.
    cancel = run_cli(settings, "cancel", str(batch_id))
    assert (cancel.returncode, cancel.stdout.strip()) == (
        0, f"batch {batch_id}: stopped 0 jobs not yet sent; completed",
    )  # fmt: skip
    retry = run_cli(settings, "retry", str(batch_id))
    assert retry.stdout.strip() == f"batch {batch_id}: re-queued 0 failed jobs"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "424242"], "batch 424242 does not exist"),
        (["cancel", "nope"], "not a batch id"),
        (["results", "424242"], "does not exist"),
        (["usage", "--since", "yesterday"], "not a date"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(
    settings: Settings, args: list[str], message: str
) -> None:
    proc = run_cli(settings, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("batch-infer: error: ")


def test_cli_rejects_a_bad_file_naming_the_line(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = batch_lines(3)
    rows[1]["method"] = "GET"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_cli(settings, "submit", str(path))
    assert proc.returncode == 2
    assert "line 2" in proc.stderr and "method" in proc.stderr
