"""``submit FILE --dry-run``: the file validated, priced with the calibrated estimate and
timed against the limits and the backlog, with nothing stored and nothing sent: a full
dump of the database and every Redis key are the same after it."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import make_url, select

from devstack.embedded import pg_bin
from devstack.simulator import Simulator
from jobs import api, dryrun, store
from jobs.calibration import MIN_MARGIN
from jobs.db import session_scope, transaction
from jobs.models import Job, JobStatus
from jobs.settings import Settings
from jobs.tokens import estimate_prompt_tokens
from tests.integration.ledger_helpers import answer, answered, body
from tests.support import jsonl, line, make_settings, run_cli, settings_env

pytestmark = pytest.mark.integration

PRICED = {"INFERENCE_PRICE_INPUT": "0.6", "INFERENCE_PRICE_OUTPUT": "3"}


@pytest.fixture
def settings(clean_db: str, redis_url: str, simulator: Simulator) -> Settings:
    """The real limits: what the dry run times a file against."""
    return make_settings(clean_db, redis_url, simulator.url, rpm=150, tpm=800_000)


def database_dump(database_url: str) -> str:
    url = make_url(database_url).set(drivername="postgresql")
    # The bundled pg_dump, not the machine's: a client older than the server refuses it,
    # and the embedded server may be newer than the machine's tools.
    dump = subprocess.run(
        [pg_bin("pg_dump"), "--no-owner", url.render_as_string(hide_password=False)],
        capture_output=True,
        text=True,
        check=True,
    )
    # pg_dump brackets its output with a random \restrict key: the rest is the data.
    return "\n".join(
        x for x in dump.stdout.splitlines() if not x.startswith(("\\restrict", "\\unrestrict"))
    )


def redis_state(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


def state(settings: Settings, client: redis.Redis) -> tuple[str, dict[bytes, bytes | None]]:
    assert settings.database_url is not None
    return database_dump(settings.database_url), redis_state(client)


def requests(n: int, words: int, max_tokens: int) -> list[dict[str, Any]]:
    """OpenAI Batch input lines with prompts of ``words`` words."""
    return [
        line(f"r{i}", body=body("word " * words) | {"max_tokens": max_tokens}) for i in range(n)
    ]


def dry_run(settings: Settings, path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = run_cli(settings, "submit", str(path), "--dry-run", "--json", env=env)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_a_dry_run_prices_and_times_a_file_and_changes_nothing(
    settings: Settings, simulator: Simulator, redis_url: str, tmp_path: Path
) -> None:
    assert settings.database_url is not None
    # The ledger has taught the calibration (the provider counts half the raw estimate,
    # and answers use a tenth of max_tokens), and a batch of 30 waits on the model.
    sample = body("word " * 400)
    raw = estimate_prompt_tokens(sample)
    for _ in range(8):
        answered(
            settings.database_url, sample, raw, raw // 2, completion=20, max_tokens=200,
            latency_ms=4000,
        )  # fmt: skip
    api.submit_batch(requests(30, 100, 50), name="ahead", settings=settings)
    client = redis.Redis.from_url(redis_url)
    rows = requests(20, 60_000, 1000)
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl(*rows))
    before = state(settings, client)

    found = dry_run(settings, path, settings_env(settings) | PRICED)
    text = run_cli(settings, "submit", str(path), "--dry-run").stdout

    assert state(settings, client) == before
    assert simulator.stats().calls == 0
    (m,) = found["models"]
    raw_each = estimate_prompt_tokens(rows[0]["body"])
    # What the provider should count: the mean ratio; what the throttle holds: the
    # calibrated estimate, with its margin.
    ratio = (raw // 2) / raw
    held_each = math.ceil(raw_each * ratio * (1 + MIN_MARGIN))  # eight even samples: trusted
    assert (m["requests"], m["raw_prompt_tokens"]) == (20, 20 * raw_each)
    assert m["prompt_tokens"] == 20 * math.ceil(raw_each * ratio)
    assert m["calibrated_on"] == 8
    assert m["reserved_tokens"] == pytest.approx(20 * held_each + 20 * 1000, abs=20)
    assert m["completion_share"] == pytest.approx(0.1)
    prompt_usd = m["prompt_tokens"] * 0.6 / 1e6
    assert m["usd_min"] == pytest.approx(prompt_usd)
    assert m["usd_max"] == pytest.approx(prompt_usd + 20 * 1000 * 3 / 1e6)
    assert m["usd_expected"] == pytest.approx(prompt_usd + 20 * 100 * 3 / 1e6)
    assert m["backlog_requests"] == 30
    assert m["latency_s"] == pytest.approx(4.0)
    # 20 + 30 requests fit a window; their tokens take more than one: tokens bind, and
    # the last call starts at the second roll.
    assert m["binding"] == "tokens"
    tokens = m["backlog_tokens"] + m["reserved_tokens"]
    window = 60 + settings.window_margin_s
    per_window = settings.tpm * 50 // tokens  # as many whole calls as fit a window
    assert math.ceil(50 / per_window) == 2
    assert m["finish_s"] == pytest.approx(window + 4.0)
    assert "dry run: nothing stored, nothing sent" in text
    assert "no price: set INFERENCE_PRICE_INPUT and INFERENCE_PRICE_OUTPUT" in text
    assert "tokens bind (800,000 TPM), behind 30 requests already queued or running" in text


def test_where_requests_bind_the_calls_take_turns_behind_the_backlog(
    settings: Settings, tmp_path: Path
) -> None:
    rows = requests(300, 20, 50)
    path = tmp_path / "small.jsonl"
    path.write_bytes(jsonl(*rows))
    api.submit_batch(requests(150, 20, 50), name="ahead", settings=settings)
    (m,) = dry_run(settings, path)["models"]
    # The same from Python, on the requests' bodies.
    (same,) = api.estimate_batch([r["body"] for r in rows], settings=settings).models
    assert (same.requests, same.reserved_tokens, same.finish_s) == (
        300, m["reserved_tokens"], m["finish_s"],
    )  # fmt: skip
    assert (m["binding"], m["backlog_requests"], m["latency_s"]) == ("requests", 150, None)
    window = 60 + settings.window_margin_s
    assert m["finish_s"] == pytest.approx((450 - 1) * window / settings.rpm)
    # Nothing answered yet: a typical tokenizer's ratio, below the raw estimate's excess.
    prior = dryrun.PRIOR_RATIO["latin"]
    expected = sum(math.ceil(estimate_prompt_tokens(r["body"]) * prior) for r in rows)
    assert m["calibrated_on"] == 0 and m["prompt_tokens"] == expected < m["raw_prompt_tokens"]
    assert m["usd_min"] is None


def test_the_batch_ends_with_the_slow_tail_of_its_last_calls(
    settings: Settings, tmp_path: Path
) -> None:
    """The last calls started near the end of a batch end with the slowest of them: the
    finish adds the recent calls' 95th-percentile latency, not their mean."""
    assert settings.database_url is not None
    sample = body("word " * 40)
    for seconds in range(1, 21):  # 1 s to 20 s: a mean of 10.5 s
        answered(settings.database_url, sample, 60, 30, latency_ms=seconds * 1000)
    path = tmp_path / "one.jsonl"
    path.write_bytes(jsonl(*requests(1, 20, 50)))
    (m,) = dry_run(settings, path)["models"]
    # Postgres' percentile_cont over 1..20: 19 + 0.05 of the way to 20.
    assert m["latency_s"] == pytest.approx(19.05)
    assert m["finish_s"] == pytest.approx(19.05)


def test_calls_longer_than_the_dispatch_window_drains_start_as_calls_end(
    settings: Settings, tmp_path: Path
) -> None:
    """Calls in flight never outnumber DISPATCH_WINDOW_MAX: with calls of 300 s they
    start one every 300 s / that many, slower than the pace of the limit."""
    assert settings.database_url is not None
    sample = body("word " * 400)
    for _ in range(8):
        answered(settings.database_url, sample, 600, 300, latency_ms=300_000)
    path = tmp_path / "slow.jsonl"
    path.write_bytes(jsonl(*requests(300, 20, 50)))
    (m,) = dry_run(settings, path)["models"]
    assert m["binding"] == "requests" and m["latency_s"] == pytest.approx(300.0)
    # The command's own settings: a DISPATCH_WINDOW set alone fixes the window there.
    cap = Settings.from_env(settings_env(settings)).dispatch_window_max
    gap = 300.0 / cap
    assert gap > (60 + settings.window_margin_s) / settings.rpm
    assert m["finish_s"] == pytest.approx(299 * gap + 300.0)


def test_a_bad_file_gets_its_line_and_nothing_is_stored(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    rows = requests(5, 20, 50)
    rows[3]["body"]["max_tokens"] = -1
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(*rows))
    client = redis.Redis.from_url(redis_url)
    before = state(settings, client)
    done = run_cli(settings, "submit", str(path), "--dry-run")
    assert done.returncode != 0
    (message,) = done.stderr.strip().splitlines()
    assert "line 4" in message and "max_tokens" in message
    assert state(settings, client) == before


def test_a_batch_under_way_shows_its_rate_and_expected_end(settings: Settings) -> None:
    """status, submit --wait and the dashboard show the calls answered in the last minute
    and when the last call should end, behind the batches before it."""
    assert settings.database_url is not None
    ahead = api.submit_batch(requests(150, 20, 50), name="ahead", settings=settings)
    batch = api.submit_batch(requests(100, 20, 50), name="behind", settings=settings)
    window = 60 + settings.window_margin_s
    assert dryrun.pace(settings, ahead.id).finish_s == pytest.approx(149 * window / 150)
    first = dryrun.pace(settings, batch.id)
    assert first.per_minute == 0
    assert first.finish_s == pytest.approx((250 - 1) * window / 150)
    # 50 jobs of the batch ahead and 30 of its own are answered, in 4 s each.
    for batch_id, n in ((ahead.id, 50), (batch.id, 30)):
        with session_scope(settings.database_url) as s:
            ids = s.execute(
                select(Job.id, Job.request)
                .where(Job.batch_id == batch_id)
                .order_by(Job.id)
                .limit(n)
            ).all()
        for job_id, request in ids:
            answer(settings.database_url, job_id, request, 30, 25, latency_ms=4000)
    later = dryrun.pace(settings, batch.id)
    assert later.per_minute == 30
    assert later.finish_s == pytest.approx((100 + 70 - 1) * window / 150 + 4.0)
    # Ten of its jobs in a call have started; five more claimed, waiting for their turn,
    # have not.
    with session_scope(settings.database_url) as s:
        left = s.execute(
            select(Job.id).where(Job.batch_id == batch.id, Job.status == JobStatus.QUEUED)
        ).scalars()
        claimed = list(left)[:15]
    with transaction(settings.database_url) as tx:
        for k, job_id in enumerate(claimed):
            assert store.claim(tx, job_id, lease_s=60) is not None
            if k < 10:
                assert store.begin_attempt(tx, job_id, lease_s=60) is not None
    later = dryrun.pace(settings, batch.id)
    assert later.finish_s == pytest.approx((100 + 70 - 10 - 1) * window / 150 + 4.0)
    status = run_cli(settings, "status", str(batch.id))
    assert "pace: 30 calls answered in the last minute; expected to end in" in status.stdout
    assert json.loads(run_cli(settings, "status", str(batch.id), "--json").stdout)["pace"] == {
        "per_minute": 30,
        "finish_s": pytest.approx(later.finish_s, abs=0.01),
    }
