"""A pool of two attachments (two simulators, two keys) behind one worker process: each
key its own bucket, jobs on whichever admits first, the ledger by attachment, and a
rejected key stopping its attachment only."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from devstack.simulator import Simulator, SimulatorConfig
from jobs import api, reports
from jobs.attachments import Attachment, key_hash
from jobs.circuit import for_settings, paused_reason
from jobs.dashboard_data import live_state
from jobs.db import session_scope
from jobs.models import Attempt, Job, JobStatus
from jobs.settings import Settings
from tests.integration.test_end_to_end import assert_key_nowhere, batch_lines
from tests.support import WEB_KEY, WorkerProcess, make_settings, run_cli, start_web, wait_until
from web.dashboard import limits

pytestmark = pytest.mark.integration

KEY_2 = "test-key-2-" + secrets.token_hex(8)
#: Each bucket admits a bulk call every 0.5 s: one alone would take twice as long.
RPM = 120


@pytest.fixture
def second() -> Iterator[Simulator]:
    sim = Simulator(SimulatorConfig(key=KEY_2)).start()
    yield sim
    sim.stop()


@pytest.fixture
def pooled(clean_db: str, redis_url: str, simulator: Simulator, second: Simulator) -> Settings:
    other = Attachment(
        alias="INFERENCE_2",
        url=second.url,
        key=KEY_2,
        model_id="kimi-k2-5",
        rpm=RPM,
        tpm=80_000_000,
        context_tokens=262_144,
        headroom=0.0,
        price=None,
    )
    return make_settings(
        clean_db, redis_url, simulator.url, rpm=RPM, pool=(other,), auth_retry_s=1.0
    )


@pytest.fixture
def worker(pooled: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(pooled, tmp_path / "worker.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def ledger(settings: Settings) -> list[tuple[str | None, str | None, int | None, int]]:
    assert settings.database_url is not None
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(Attempt.attachment, Attempt.key_hash, Attempt.http_status, Attempt.job_id)
        ).all()
    return [(a, k, status, job) for a, k, status, job in rows]


def test_a_batch_runs_on_both_keys_and_the_ledger_says_which(
    pooled: Settings,
    simulator: Simulator,
    second: Simulator,
    worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    batch = api.submit_batch(batch_lines(40), name="pool", settings=pooled)
    progress = batch.wait(timeout=120)
    assert (progress.status, progress.succeeded, progress.failed) == ("completed", 40, 0)
    first_calls, second_calls = simulator.stats().calls, second.stats().calls
    # Paced at 2 calls a second each, one bucket alone could not have taken all 40 in
    # the time the other one was admitting.
    assert first_calls >= 10 and second_calls >= 10, (first_calls, second_calls)
    assert first_calls + second_calls == 40
    rows = ledger(pooled)
    by_attachment = Counter((a, k) for a, k, _, _ in rows)
    assert by_attachment == {
        ("INFERENCE", key_hash(pooled.inference_key)): first_calls,
        ("INFERENCE_2", key_hash(KEY_2)): second_calls,
    }
    usage = reports.usage(pooled.database_url or "", batch_id=batch.id)
    assert sorted((u.attachment, u.calls, u.total_tokens) for u in usage) == [
        ("INFERENCE", first_calls, simulator.stats().total_tokens),
        ("INFERENCE_2", second_calls, second.stats().total_tokens),
    ]
    # status and the batch's page say how the batch split over the keys, busiest first.
    tokens = {
        "INFERENCE": simulator.stats().total_tokens,
        "INFERENCE_2": second.stats().total_tokens,
    }
    calls = {"INFERENCE": first_calls, "INFERENCE_2": second_calls}
    busiest = sorted(calls, key=lambda a: (-calls[a], a))
    split = "; ".join(f"{a} {calls[a]:,} calls, {tokens[a]:,} tokens" for a in busiest)
    status = run_cli(pooled, "status", str(batch.id))
    assert status.returncode == 0, status.stderr
    assert f"by attachment: {split}\n" in status.stdout
    shown = json.loads(run_cli(pooled, "status", str(batch.id), "--json").stdout)
    assert shown["attachments"] == {a: {"calls": calls[a], "tokens": tokens[a]} for a in calls}
    web = start_web(pooled, tmp_path / "web.log")
    try:
        page = httpx.get(
            f"{web.url}/batches/batch_{batch.id}/state.json",
            auth=httpx.BasicAuth("anyone", WEB_KEY),
            timeout=30,
        )
    finally:
        web.stop(10)
    assert page.status_code == 200, page.text
    assert page.json()["batch"]["usage"].endswith(f" (by attachment: {split})")
    log = worker.log()
    assert 'attachments="INFERENCE,INFERENCE_2"' in log
    assert_key_nowhere(pooled, log)
    assert KEY_2 not in log


def test_a_rejected_key_stops_its_attachment_only_and_heals(
    pooled: Settings, simulator: Simulator, second: Simulator, worker: WorkerProcess
) -> None:
    assert pooled.database_url is not None
    batch = api.submit_batch(batch_lines(40), name="pool-401", settings=pooled)
    wait_until(lambda: second.stats().ok >= 3, timeout=60, what="INFERENCE_2 answers")
    second.set_key("rotated-" + secrets.token_hex(4))  # INFERENCE_2's key is revoked
    progress = batch.wait(timeout=120)
    assert (progress.status, progress.succeeded, progress.failed) == ("completed", 40, 0)
    rejected = second.stats().client_errors
    assert rejected >= 1
    rows = ledger(pooled)
    # Every rejection is INFERENCE_2's, recorded; every job has exactly one answer.
    assert Counter(a for a, _, status, _ in rows if status == 401) == {"INFERENCE_2": rejected}
    answered = Counter(job for _, _, status, job in rows if status == 200)
    assert len(answered) == 40 and set(answered.values()) == {1}
    with session_scope(pooled.database_url) as s:
        statuses = set(s.execute(select(Job.status)).scalars())
    assert statuses == {JobStatus.SUCCEEDED}
    first, rotated = for_settings(pooled)
    assert first.state() is None
    state = rotated.state()
    assert state is not None and state.alias == "INFERENCE_2" and state.status == 401
    assert "fix INFERENCE_2_KEY" in state.describe()
    # The other key is accepted: calls are not paused, and status and the dashboard say
    # which attachment is set aside.
    assert paused_reason(pooled) is None and batch.calls_paused() is None
    aside = batch.keys_set_aside()
    assert aside is not None
    assert aside.startswith("INFERENCE_2 set aside: the provider rejected its key (HTTP 401")
    assert "fix INFERENCE_2_KEY to use it again" in aside
    assert live_state(pooled).circuit == aside

    # The key is restored at the provider: the next probe finds it, and INFERENCE_2
    # takes calls again.
    second.set_key(KEY_2)
    state = rotated.state()
    assert state is not None
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    time.sleep(max(0.0, (state.retry_at - now).total_seconds()) + 0.2)  # the probe is due
    before = second.stats().ok
    again = api.submit_batch(batch_lines(40), name="pool-healed", settings=pooled)
    assert again.wait(timeout=120).succeeded == 40
    assert second.stats().ok > before
    assert rotated.state() is None
    assert again.keys_set_aside() is None and live_state(pooled).circuit is None


def test_the_dashboard_charts_the_limits_of_every_key(pooled: Settings) -> None:
    # The chart's ledger counts every attachment's calls, so its limit is the pool's.
    (first,) = [a for a in pooled.attachments if a.alias == "INFERENCE"]
    assert limits(pooled) == (2 * RPM, first.tpm + 80_000_000)
    assert limits(pooled.replace(pool=())) == (RPM, first.tpm)
