"""The dashboard over HTTP: ``python -m web`` on the real Postgres, Redis and simulator.

What a page shows is checked against the database it was read from: the batch
counters, the queued and calling jobs, the pause key, the ledger's minutes.
"""

from __future__ import annotations

import datetime as dt
import html
import itertools
import re
import time
from collections.abc import Iterator
from html import escape
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from devstack.procs import WebProcess
from devstack.simulator import Simulator
from jobs import api, dryrun, store
from jobs.budget import Budget
from jobs.connections import redis_client
from jobs.constants import throttle_pause_key
from jobs.db import session_scope
from jobs.models import Attempt, Batch, Job, JobStatus
from jobs.pricing import NO_PRICE
from jobs.settings import Settings
from tests.integration.ledger_helpers import answer
from tests.support import WEB_KEY, WorkerProcess, body, jsonl, line, wait_until

pytestmark = pytest.mark.integration

#: A browser's login: any user name, a key of API_KEYS as the password.
BASIC = httpx.BasicAuth("anyone", WEB_KEY)


@pytest.fixture
def browser_client(web: WebProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web.url, auth=BASIC, timeout=30) as client:
        yield client


def state(client: httpx.Client, path: str = "/state.json") -> dict[str, Any]:
    reply = client.get(path)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    data: dict[str, Any] = reply.json()
    return data


@pytest.mark.parametrize(
    "path", ["/", "/state.json", "/throttle.svg", "/batches/batch_1", "/static/dashboard.js"]
)
def test_every_page_asks_a_browser_for_the_key(web: WebProcess, path: str) -> None:
    with httpx.Client(base_url=web.url, timeout=30) as client:
        for auth in (None, httpx.BasicAuth("anyone", "not-the-key")):
            reply = client.get(path, auth=auth)
            assert reply.status_code == 401, (path, auth)
            assert reply.headers["www-authenticate"].startswith("Basic realm=")


def test_the_key_as_basic_password_or_bearer_opens_the_pages(web: WebProcess) -> None:
    with httpx.Client(base_url=web.url, timeout=30) as client:
        page = client.get("/", auth=BASIC)
        bearer = client.get("/", headers={"Authorization": f"Bearer {WEB_KEY}"})
        script = client.get("/static/dashboard.js", auth=BASIC)
        style = client.get("/static/dashboard.css", auth=BASIC)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert bearer.status_code == 200
    assert "<h2>Batches</h2>" in page.text and "No batches yet." in page.text
    # Nothing is fetched from elsewhere: the script and the style sheet are ours.
    assert re.findall(r'(?:src|href)="(https?:)?//', page.text) == []
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "data-state" in script.text
    assert style.status_code == 200 and ".bar" in style.text


def test_the_list_and_its_state_match_the_database(
    settings: Settings, browser_client: httpx.Client
) -> None:
    assert settings.database_url and settings.redis_url
    first = api.submit_batch([body("a"), body("b")], name="first", settings=settings)
    # A name is someone else's text: it is shown, never run.
    second = api.submit_batch(
        [body(f"q{i}") for i in range(5)], name="<script>alert(1)</script>", settings=settings
    )
    interactive = api.enqueue([{"role": "user", "content": "now"}], settings=settings)
    # Two jobs a worker holds, one of them with its call on the wire: set as a worker's
    # transactions set them, in the database the page reads.
    with session_scope(settings.database_url) as s:
        ids = list(s.execute(select(Job.id).where(Job.batch_id == second.id).order_by(Job.id)))
        for (job_id,), calling in zip(ids[:2], (True, False), strict=True):
            s.execute(update(Job).where(Job.id == job_id).values(status="running", calling=calling))
        s.execute(update(Batch).where(Batch.id == second.id).values(queued=3, running=2))
    # The bucket paused by a provider 429 for 30 s from now, by Redis's clock.
    client = redis_client(settings.redis_url)
    now_s, now_us = client.time()
    pause_until_ms = now_s * 1000 + now_us // 1000 + 30_000
    client.set(throttle_pause_key(settings.bucket_name), str(pause_until_ms), px=30_000)
    client.close()

    page = browser_client.get("/")
    shown = state(browser_client)

    assert page.status_code == 200
    assert page.text.index("batch_" + str(second.id)) < page.text.index(f"batch_{first.id}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert(1)" not in page.text
    assert [b["id"] for b in shown["batches"]] == [f"batch_{second.id}", f"batch_{first.id}"]
    with session_scope(settings.database_url) as s:
        for listed in shown["batches"]:
            row = s.get(Batch, listed["number"])
            assert row is not None
            for field in ("status", "total", "queued", "running", "succeeded", "failed"):
                assert listed[field] == getattr(row, field), field
            assert listed["done"] == row.succeeded + row.failed + row.cancelled
            assert listed["created_at"] == row.created_at.isoformat()
            assert listed["elapsed_s"] >= 0
        queued = s.execute(
            select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
        ).scalar_one()
        calling = s.execute(
            select(func.count()).select_from(Job).where(Job.calling.is_(True))
        ).scalar_one()
    throttle = shown["throttle"]
    assert (throttle["backlog"], throttle["in_flight"], throttle["running"]) == (queued, 1, 2)
    assert calling == 1 and queued == 2 + 3 + 1  # first's two, second's three, interactive
    assert interactive.status() == JobStatus.QUEUED
    assert (throttle["rpm_limit"], throttle["tpm_limit"]) == (settings.rpm, settings.tpm)
    assert 0 < throttle["paused_for_s"] <= 30
    assert throttle["circuit"] is None and throttle["redis_error"] is None
    assert throttle["workers"] == 0
    # The page says the same as its state.
    assert f'data-field="backlog">{queued:,}<' in page.text
    # A batch under way shows its pace (jobs.dryrun.pace): none ended yet, and its end.
    under_way = next(b for b in shown["batches"] if b["number"] == second.id)
    pace = dryrun.pace(settings, second.id)
    assert under_way["pace"] == pace.short() and pace.short().startswith("0/min, ")
    assert f'data-field="pace">{pace.short()}<' in page.text
    assert 'data-field="in_flight">1<' in page.text
    assert "s left (the provider answered 429)" in page.text
    # A batch whose budget ran out shows why instead of a pace.
    with session_scope(settings.database_url) as s:
        assert store.pause_batch(s, first.id, "budget reached: 10 tokens spent of 12 tokens")
    paused = next(b for b in state(browser_client)["batches"] if b["number"] == first.id)
    assert paused["pace"] == "paused: budget reached: 10 tokens spent of 12 tokens"
    assert 'data-field="pace">paused: budget reached: 10 tokens' in browser_client.get("/").text


def test_a_batch_page_shows_failures_files_and_validation_errors(
    settings: Settings, simulator: Simulator, browser_client: httpx.Client, tmp_path: Path
) -> None:
    assert settings.database_url
    bearer = {"Authorization": f"Bearer {WEB_KEY}"}
    rows = [line(f"q{i}") for i in range(4)]
    # A content part of a type the simulator does not know: it answers 400, for good.
    rows[2]["body"]["messages"] = [{"role": "user", "content": [{"type": "video", "x": 1}]}]
    bad = [line("ok"), line("x", body={"model": "kimi-k2-5", "messages": [{"role": "wizard"}]})]
    created = []
    for name, content in (("good.jsonl", jsonl(*rows)), ("bad.jsonl", jsonl(*bad))):
        upload = browser_client.post(
            "/v1/files",
            files={"file": (name, content)},
            data={"purpose": "batch"},
            headers=bearer,
        )
        assert upload.status_code == 200, upload.text
        batch = browser_client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
            headers=bearer,
        )
        assert batch.status_code == 200, batch.text
        created.append(batch.json()["id"])
    good, failed = created
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=4)
    try:
        for batch_id, end in ((good, "completed"), (failed, "failed")):
            wait_until(
                lambda b=batch_id, e=end: (
                    state(browser_client, f"/batches/{b}/state.json")["batch"]["status"] == e
                ),
                90,
                f"{batch_id} {end}",
            )
    finally:
        worker.stop()

    page = browser_client.get(f"/batches/{good}")
    detail = state(browser_client, f"/batches/{good}/state.json")
    assert page.status_code == 200
    with session_scope(settings.database_url) as s:
        (job,) = s.execute(
            select(Job).where(
                Job.batch_id == int(good.removeprefix("batch_")), Job.status == "failed"
            )
        ).scalars()
        row = s.get(Batch, job.batch_id)
        assert row is not None
    assert job.custom_id == "q2" and job.error_status == 400 and job.last_error
    # The failed job, its code, the provider's status and its message, as stored.
    assert f'<tr data-job="{job.id}">' in page.text
    for shown in (job.custom_id, job.error_code, f">{job.error_status}<"):
        assert str(shown) in page.text, shown
    assert escape(job.last_error) in page.text
    assert detail["failed_jobs"] == [
        {
            "id": job.id,
            "custom_id": "q2",
            "error_code": job.error_code,
            "error_status": 400,
            "last_error": job.last_error,
            "attempts": job.attempts,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        }
    ]
    assert detail["batch"]["succeeded"] == row.succeeded == 3 and detail["batch"]["failed"] == 1
    assert set(detail["timestamps"]) >= {"created_at", "in_progress_at", "completed_at"}
    # Both files are linked, and the browser's Basic login downloads them.
    assert row.output_file_id and row.error_file_id
    for file_id, expected in ((row.output_file_id, 3), (row.error_file_id, 1)):
        href = f"/v1/files/{file_id}/content"
        assert f'href="{href}"' in page.text
        download = browser_client.get(href)
        assert download.status_code == 200
        assert len(download.text.splitlines()) == expected

    page = browser_client.get(f"/batches/{failed}")
    detail = state(browser_client, f"/batches/{failed}/state.json")
    with session_scope(settings.database_url) as s:
        stored = s.get(Batch, int(failed.removeprefix("batch_")))
        assert stored is not None and stored.errors
    assert detail["validation_errors"] == stored.errors
    assert "<h2>Validation errors</h2>" in page.text
    for error in stored.errors:
        assert escape(error["message"]) in page.text
        assert f"<td>{escape(error['param'])}</td>" in page.text

    missing = browser_client.get("/batches/batch_999999")
    assert missing.status_code == 404 and "No batch batch_999999." in missing.text


def test_the_throttle_chart_counts_the_ledger_by_minute(
    settings: Settings, browser_client: httpx.Client
) -> None:
    assert settings.database_url
    batch = api.submit_batch([body("a")], name="ledger", settings=settings)
    # Calls spread over the last hour and one from before it, written in the ledger as
    # a worker writes them (started_at by the database's clock).
    ages_min = [0, 0, 1, 5, 5, 5, 30, 58, 150]
    with session_scope(settings.database_url) as s:
        job_id = s.execute(select(Job.id).where(Job.batch_id == batch.id)).scalar_one()
        for number, age in enumerate(ages_min, start=1):
            s.add(
                Attempt(
                    job_id=job_id,
                    number=number,
                    model="kimi-k2-5",
                    started_at=func.now() - dt.timedelta(minutes=age, seconds=1),
                    http_status=200,
                    prompt_tokens=100 * number,
                    completion_tokens=7,
                    total_tokens=100 * number + 7,
                )
            )
        s.execute(  # one call still on the wire: no usage yet
            text(
                "INSERT INTO attempts (job_id, number, model, started_at) "
                "VALUES (:job, 99, 'kimi-k2-5', now())"
            ),
            {"job": job_id},
        )

    minutes = state(browser_client)["throttle"]["minutes"]
    svg = browser_client.get("/throttle.svg")
    page = browser_client.get("/")

    assert len(minutes) == 60
    starts = [dt.datetime.fromisoformat(m["minute"]) for m in minutes]
    assert all(b - a == dt.timedelta(minutes=1) for a, b in itertools.pairwise(starts))
    with session_scope(settings.database_url) as s:

        def ledger(start: dt.datetime, end: dt.datetime) -> tuple[int, int]:
            calls, tokens = s.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(Attempt.prompt_tokens + Attempt.completion_tokens), 0),
                ).where(Attempt.started_at >= start, Attempt.started_at < end)
            ).one()
            return int(calls), int(tokens)

        for m, start in zip(minutes, starts, strict=True):
            assert (m["requests"], m["tokens"]) == ledger(start, start + dt.timedelta(minutes=1)), (
                m["minute"]
            )
        # Every call of the hour is in a bar; the one from before it is in none.
        total = ledger(starts[0], starts[-1] + dt.timedelta(minutes=1))
    assert sum(m["requests"] for m in minutes) == total[0] == len(ages_min) - 1 + 1
    assert sum(m["tokens"] for m in minutes) == total[1]
    # The SVG, alone and inline, draws the same numbers, one bar a minute, both panels.
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    for drawn in (svg.text, page.text):
        bars = re.findall(r'data-minute="([^"]+)" data-value="(\d+)"', drawn)
        assert len(bars) == 120
        assert [int(v) for _, v in bars[:60]] == [m["requests"] for m in minutes]
        assert [int(v) for _, v in bars[60:]] == [m["tokens"] for m in minutes]
        assert f'data-limit="{settings.rpm}"' in drawn and f'data-limit="{settings.tpm}"' in drawn


def test_the_state_stays_cheap_on_a_large_batch(
    settings: Settings, browser_client: httpx.Client
) -> None:
    """100,000 jobs: the pages read the batch's counters and indexes, never every job."""
    assert settings.database_url
    batch = api.submit_batch([body("seed")], name="big", settings=settings)
    with session_scope(settings.database_url) as s:
        s.execute(
            text(
                "INSERT INTO jobs (batch_id, custom_id, model, request, est_prompt_tokens,"
                " status, error_code, last_error, finished_at, priority, attempts) "
                "SELECT :b, 'big-' || g, 'kimi-k2-5', '{}'::jsonb, 5,"
                " CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END,"
                " CASE WHEN g % 50 = 0 THEN 'invalid_request' END,"
                " CASE WHEN g % 50 = 0 THEN 'refused ' || g END, now(), 1, 1 "
                "FROM generate_series(1, 100000) AS g"
            ),
            {"b": batch.id},
        )
        s.execute(
            update(Batch)
            .where(Batch.id == batch.id)
            .values(total=100_001, succeeded=98_000, failed=2_000, queued=1)
        )
        s.execute(text("ANALYZE jobs"))
    started = time.perf_counter()
    detail = state(browser_client, f"/batches/batch_{batch.id}/state.json")
    page = browser_client.get(f"/batches/batch_{batch.id}")
    listing = state(browser_client)
    elapsed = time.perf_counter() - started
    assert detail["batch"]["failed"] == 2_000 and detail["failed_jobs_shown"] == 100
    assert [j["custom_id"] for j in detail["failed_jobs"][:2]] == ["big-50", "big-100"]
    assert "The first 100 of" in page.text
    assert listing["batches"][0]["done"] == 100_000
    print(f"\nbatch page, its state and the list on 100,001 jobs: {elapsed:.3f} s")


def test_a_batch_page_shows_its_usage_its_dollars_and_its_budget(
    settings: Settings, browser_client: httpx.Client
) -> None:
    assert settings.database_url is not None
    batch = api.submit_batch(
        [body("a"), body("b")], name="spent", budget=Budget(tokens=10_000), settings=settings
    )
    with session_scope(settings.database_url) as s:
        first = s.execute(
            select(Job.id, Job.request).where(Job.batch_id == batch.id).order_by(Job.id)
        ).first()
    assert first is not None
    job_id, request = first
    answer(settings.database_url, job_id, request, 30, 25, completion=5, max_tokens=50)
    expected = (
        f"25 prompt + 5 completion tokens ({NO_PRICE}); budget: 30 tokens spent of 10,000 tokens"
    )
    detail = state(browser_client, f"/batches/batch_{batch.id}/state.json")
    assert detail["batch"]["usage"] == expected
    page = browser_client.get(f"/batches/batch_{batch.id}").text
    assert f'<span data-field="usage">{html.escape(expected)}</span>' in page
