"""The real ``openai`` SDK against ``python -m web``, real workers and the simulator.

Every object the API returns is validated by the SDK's own pydantic types, and every
line of the output and error files by a JSON Schema of OpenAI's batch output line,
each 200 body as an ``openai.types.chat.ChatCompletion``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from devstack.procs import WebProcess
from devstack.simulator import Simulator
from jobs import retention
from jobs.pricing import Price
from jobs.settings import Settings
from tests.support import WEB_KEY, WorkerProcess, jsonl, line, make_settings

pytestmark = pytest.mark.integration

PRICE = Price(input=0.6, output=3.0)

#: OpenAI's batch output line, as its documentation describes it.
OUTPUT_LINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "custom_id": {"type": "string"},
        "response": {
            "type": ["object", "null"],
            "required": ["status_code", "request_id", "body"],
            "additionalProperties": False,
            "properties": {
                "status_code": {"type": "integer"},
                "request_id": {"type": ["string", "null"]},
                "body": {"type": ["object", "null"]},
            },
        },
        "error": {
            "type": ["object", "null"],
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def check_line(row: dict[str, Any]) -> None:
    """One output line against the schema; a 200 body must be a chat completion."""
    jsonschema.validate(row, OUTPUT_LINE_SCHEMA)
    response = row["response"]
    assert response is not None or row["error"] is not None, row
    if response is not None:
        assert response["request_id"] != "None", row
        if response["status_code"] == 200:
            ChatCompletion.model_validate(response["body"])


@pytest.fixture
def settings(clean_db: str, redis_url: str, simulator: Simulator) -> Settings:
    """Priced, so that the batches' usage comes with its dollars."""
    return make_settings(clean_db, redis_url, simulator.url, price=PRICE)


@pytest.fixture
def client(web: WebProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{web.url}/v1", api_key=WEB_KEY, _strict_response_validation=True
    ) as sdk:
        yield sdk


def wait_for(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        Batch.model_validate(batch.model_dump())
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s"
        time.sleep(0.3)


def download(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    FileObject.model_validate(client.files.retrieve(file_id).model_dump())
    rows = [json.loads(t) for t in client.files.content(file_id).text.splitlines()]
    for row in rows:
        check_line(row)
    return rows


def upload(client: openai.OpenAI, tmp_path: Path, content: bytes) -> FileObject:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(content)
    with path.open("rb") as fh:
        created = client.files.create(file=fh, purpose="batch")
    FileObject.model_validate(created.model_dump())
    return created


def test_upload_create_poll_and_download_with_the_sdk(
    settings: Settings, simulator: Simulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    rows = [line(f"q{i}") for i in range(12)]
    # One request the provider refuses: a content part of a type it does not know,
    # which our validation passes through untouched; the simulator answers 400.
    rows[5]["body"]["messages"] = [{"role": "user", "content": [{"type": "video", "x": 1}]}]
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        created = upload(client, tmp_path, jsonl(*rows))
        assert created.id.startswith("file-") and created.purpose == "batch"
        assert client.files.content(created.id).content == jsonl(*rows)
        batch = client.batches.create(
            input_file_id=created.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"team": "search"},
        )
        assert batch.status == "validating" and batch.id.startswith("batch_")
        done = wait_for(client, batch.id, {"completed", "failed"}, 90)
    finally:
        worker.stop()
    assert done.status == "completed", done.errors
    assert done.metadata == {"team": "search"}
    assert done.request_counts is not None and done.request_counts.total == 12
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(done, stamp) is not None, stamp
    output = download(client, done.output_file_id)
    errors = download(client, done.error_file_id)
    answered = [r["custom_id"] for r in output + errors]
    assert sorted(answered) == sorted(r["custom_id"] for r in rows)  # each exactly once
    assert [r["custom_id"] for r in output] == [f"q{i}" for i in range(12) if i != 5]
    assert done.request_counts.completed == len(output) and done.request_counts.failed == 1
    assert done.usage is not None and done.usage.input_tokens > 0
    # Not OpenAI's field: the usage's cost at the configured price, through the SDK.
    usd = (done.usage.input_tokens * PRICE.input + done.usage.output_tokens * PRICE.output) / 1e6
    assert (done.model_extra or {})["usage_usd"] == pytest.approx(usd)
    # The provider's refusal keeps its answer: a response with its status, no error.
    (refused,) = errors
    assert refused["custom_id"] == "q5" and refused["error"] is None
    assert refused["response"]["status_code"] == 400
    listed = client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id]


def test_a_bad_file_fails_the_batch_with_its_line_numbers(
    settings: Settings, simulator: Simulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    good = line("ok")
    bad_role = line("x", body={"model": "kimi-k2-5", "messages": [{"role": "wizard"}]})
    created = upload(client, tmp_path, jsonl(good, bad_role, good))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        batch = client.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for(client, batch.id, {"failed", "in_progress", "completed"}, 60)
    finally:
        worker.stop()
    assert done.status == "failed"
    assert done.errors is not None
    found = {(e.line, e.code, e.param) for e in done.errors.data or []}
    # The wrong role on line 2, the custom_id used twice on line 3.
    assert (2, "invalid_request", "body.messages[0].role") in found, found
    assert (3, "invalid_request", "custom_id") in found, found
    assert done.failed_at is not None and done.request_counts is not None
    assert done.request_counts.total == 0
    assert done.output_file_id is None and done.error_file_id is None


def test_a_purged_output_file_still_reads_as_chat_completions(
    settings: Settings, simulator: Simulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    created = upload(client, tmp_path, jsonl(*(line(f"p{i}") for i in range(3))))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        batch = client.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for(client, batch.id, {"completed", "failed"}, 60)
    finally:
        worker.stop()
    assert done.status == "completed"
    # Retention deletes the bodies of every job finished before now.
    assert retention.purge(settings, older_than=dt.datetime.now(dt.UTC)).jobs == 3
    rows = download(client, done.output_file_id)  # each line checked, bodies included
    assert [r["error"]["code"] for r in rows] == ["purged"] * 3
    assert all(r["response"]["body"]["choices"] == [] for r in rows)
    assert all(r["response"]["body"]["usage"]["total_tokens"] > 0 for r in rows)


@contextlib.contextmanager
def _on_a_slow_worker(
    client: openai.OpenAI, settings: Settings, tmp_path: Path, ids: list[str], window: str
) -> Iterator[Batch]:
    """A batch of ``ids`` created through the SDK, run by a worker that holds its jobs.

    One call a window: the worker holds the other jobs, waiting for their turns.
    """
    created = upload(client, tmp_path, jsonl(*(line(i) for i in ids)))
    slow = settings.replace(rpm=1, dispatch_window=30, window_margin_s=0.0)
    worker = WorkerProcess(slow, tmp_path / "worker.log", concurrency=40)
    worker.wait_ready()
    try:
        yield client.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window=window
        )
    finally:
        worker.stop()


def test_a_cancel_through_the_sdk_ends_cancelled_with_both_files(
    settings: Settings, simulator: Simulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    ids = [f"x{i}" for i in range(12)]
    with _on_a_slow_worker(client, settings, tmp_path, ids, "24h") as batch:
        wait_for(client, batch.id, {"in_progress"}, 30)
        deadline = time.monotonic() + 30
        while simulator.stats().calls < 1:
            assert time.monotonic() < deadline, "the first window's call"
            time.sleep(0.1)
        cancelling = client.batches.cancel(batch.id)
        Batch.model_validate(cancelling.model_dump())
        assert cancelling.status in ("cancelling", "cancelled")
        done = wait_for(client, batch.id, {"cancelled"}, 30)
    assert done.cancelling_at is not None and done.cancelled_at is not None
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 11)
    output, errors = download(client, done.output_file_id), download(client, done.error_file_id)
    assert len(output) == 1 and {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    assert sorted(r["custom_id"] for r in output + errors) == sorted(ids)
    assert simulator.stats().calls == 1


def test_a_short_completion_window_through_the_sdk_ends_expired(
    settings: Settings, simulator: Simulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    ids = [f"y{i}" for i in range(8)]
    with _on_a_slow_worker(client, settings, tmp_path, ids, "4s") as batch:
        assert batch.expires_at is not None and batch.expires_at - batch.created_at == 4
        done = wait_for(client, batch.id, {"expired", "completed"}, 40)
    assert done.status == "expired" and done.expired_at is not None
    output, errors = download(client, done.output_file_id), download(client, done.error_file_id)
    assert len(output) == 1 and {r["error"]["code"] for r in errors} == {"batch_expired"}
    assert sorted(r["custom_id"] for r in output + errors) == sorted(ids)


def test_a_budget_in_the_metadata_pauses_the_batch_in_progress_with_its_reason(
    settings: Settings, simulator: Simulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    short = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "hi"}]}
    rows = [line(f"b{i}", body=short | {"max_tokens": 50}) for i in range(30)]
    created = upload(client, tmp_path, jsonl(*rows))
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=created.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"budget_usd": "five"},
        )
    assert "metadata.budget_usd: must be a number of US dollars, got 'five'" in str(refused.value)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        batch = client.batches.create(
            input_file_id=created.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"budget_tokens": "400"},
        )
        deadline = time.monotonic() + 60
        ended = {"failed", "completed", "cancelled", "expired"}
        while not ((batch.model_extra or {}).get("paused_reason") or batch.status in ended):
            assert time.monotonic() < deadline, "no pause within 60 s"
            time.sleep(0.3)
            batch = client.batches.retrieve(batch.id)
    finally:
        worker.stop()
    # OpenAI's statuses are a fixed list: paused, it stays in_progress and says why.
    assert batch.status == "in_progress"
    reason = (batch.model_extra or {})["paused_reason"]
    assert reason.startswith("budget reached: ") and "of 400 tokens" in reason, reason
    assert batch.usage is not None and batch.usage.total_tokens <= 400
    assert batch.request_counts is not None and 0 < batch.request_counts.completed < 30
