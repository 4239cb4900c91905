"""The Python API: validation before storage, bulk submission, handles and results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from jobs import api
from jobs.db import session_scope
from jobs.models import Batch, Job, JobStatus, Priority
from jobs.settings import Settings
from jobs.validation import ValidationError

pytestmark = pytest.mark.integration


def line(n: int, **body_extra: Any) -> dict[str, Any]:
    body = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": f"q{n}"}]}
    return {
        "custom_id": f"r{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body | body_extra,
    }


def count(db: str, model: type[Batch] | type[Job]) -> int:
    with session_scope(db) as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def test_enqueue_stores_an_interactive_job_with_passthrough_fields(settings: Settings) -> None:
    assert settings.database_url
    handle = api.enqueue(
        [{"role": "user", "content": "hi"}],
        max_tokens=20,
        top_p=0.9,
        extended_thinking={"enabled": True, "budget_tokens": 64},
        metadata={"ticket": 7},
        settings=settings,
    )
    assert handle.status() == JobStatus.QUEUED
    with session_scope(settings.database_url) as s:
        job = s.get(Job, handle.id)
        assert job is not None
        assert job.priority == Priority.INTERACTIVE
        assert job.request["top_p"] == 0.9
        assert job.request["extended_thinking"] == {"enabled": True, "budget_tokens": 64}
        assert job.request["model"] == "kimi-k2-5"
        assert job.custom_id == f"job-{handle.id}"
        assert job.meta == {"ticket": 7}
        assert job.dispatched_at is not None  # published right away


def test_enqueue_rejects_a_bad_request_without_storing(settings: Settings) -> None:
    assert settings.database_url
    with pytest.raises(ValidationError, match="role"):
        api.enqueue([{"role": "robot", "content": "hi"}], settings=settings)
    assert count(settings.database_url, Job) == 0


def test_submit_batch_validates_whole_batch_first(settings: Settings) -> None:
    assert settings.database_url
    requests = [line(1), line(2), line(3, max_tokens=0), line(4)]
    with pytest.raises(ValidationError) as info:
        api.submit_batch(requests, name="bad", settings=settings)
    assert "request 3" in str(info.value) and "max_tokens" in str(info.value)
    assert count(settings.database_url, Batch) == 0
    assert count(settings.database_url, Job) == 0


def test_submit_batch_accepts_plain_bodies_and_lines(settings: Settings) -> None:
    plain = {"messages": [{"role": "user", "content": "plain"}]}
    batch = api.submit_batch([plain, line(2)], name="mixed", settings=settings)
    progress = batch.progress()
    assert (progress.total, progress.queued, progress.name, progress.source) == (
        2, 2, "mixed", "api",
    )  # fmt: skip


def test_submit_file_reports_line_numbers_and_stores_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    assert settings.database_url
    path = tmp_path / "in.jsonl"
    rows = [line(1), line(2), {**line(3), "url": "/v1/embeddings"}, line(1)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValidationError) as info:
        api.submit_file(path, settings=settings)
    message = str(info.value)
    assert "line 3" in message and "url" in message
    assert "line 4" in message and "r1" in message  # duplicate custom_id
    assert count(settings.database_url, Job) == 0


def test_submit_file_then_results_and_cancel(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(json.dumps(line(i)) for i in range(1, 6)) + "\n")
    batch = api.submit_file(path, settings=settings)
    assert batch.progress().source == "file"
    assert batch.progress().name == "ok.jsonl"
    assert list(batch.results()) == []  # nothing finished yet
    assert batch.cancel() == 5
    progress = batch.wait(timeout=5)
    assert (progress.status, progress.cancelled) == ("cancelled", 5)
    results = list(batch.results())
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(1, 6)]
    assert all(r["response"] is None and r["error"]["code"] == "batch_cancelled" for r in results)


def test_unknown_ids_raise_not_found(settings: Settings) -> None:
    with pytest.raises(api.NotFoundError, match="batch 999"):
        api.get_batch(999, settings=settings)
    with pytest.raises(api.NotFoundError, match="job 999"):
        api.get_job(999, settings=settings)


def test_scheduled_submission_is_created_once_per_slot(settings: Settings, tmp_path: Path) -> None:
    assert settings.database_url
    path = tmp_path / "nightly.jsonl"
    path.write_text("\n".join(json.dumps(line(i)) for i in range(1, 4)) + "\n")
    first = api.submit_scheduled(str(path), name="nightly", cron="0 2 * * *", settings=settings)
    again = api.submit_scheduled(str(path), name="nightly", cron="0 2 * * *", settings=settings)
    assert first.created and not again.created and first.id == again.id
    assert first.progress().source == "schedule"
    assert count(settings.database_url, Job) == 3
