"""Webhooks end to end: real workers, the simulator, and a receiver on loopback that
checks every request with the ``openai`` SDK, as a user's receiver would.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from devstack.procs import free_port
from devstack.simulator import Simulator
from jobs import api, store, webhooks
from jobs.db import session_scope, transaction
from jobs.files import Upload
from jobs.models import Batch, WebhookEvent
from jobs.settings import Settings
from jobs.shapes import batch_public_id
from tests.support import (
    WEB_KEY,
    WorkerProcess,
    body,
    jsonl,
    line,
    make_settings,
    start_web,
    wait_until,
)

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
SDK = openai.OpenAI(api_key="x", webhook_secret=SECRET)


@dataclass(frozen=True)
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    #: What the SDK said of it on arrival, with the receiver's tolerance: None = valid.
    refused: str | None
    answered: int


class Receiver:
    """An HTTP server on loopback that records each POST, checks its signature on
    arrival and answers ``status``. It listens only once :meth:`start` is called: until
    then its URL refuses connections, as a receiver that is down does."""

    def __init__(self, *, tolerance: int = 300) -> None:
        self.port = free_port()
        # The path stands for a token in a user's URL: it must never be logged.
        self.path = f"/hooks/{secrets.token_hex(8)}"
        self.url = f"http://127.0.0.1:{self.port}{self.path}"
        self.tolerance = tolerance
        self.status = 200
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    SDK.webhooks.verify_signature(payload, headers, tolerance=receiver.tolerance)
                    refused = None
                except openai.InvalidWebhookSignatureError as exc:
                    refused = str(exc)
                status = receiver.status
                with receiver._lock:
                    receiver.received.append(
                        Received(time.time(), headers, payload, refused, status)
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = Receiver()
    yield hooks
    hooks.stop()


def hooked(settings: Settings, receiver: Receiver, **overrides: object) -> Settings:
    """``settings`` sending to ``receiver``, retrying within a second."""
    assert settings.database_url and settings.redis_url and settings.inference_url
    values: dict[str, object] = {
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        "webhook_backoff_base": 0.2,
        "webhook_backoff_max": 0.5,
    }
    values.update(overrides)
    return make_settings(
        settings.database_url, settings.redis_url, settings.inference_url, **values
    )


def event_rows(settings: Settings) -> list[WebhookEvent]:
    assert settings.database_url is not None
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at)))


def the_event(receiver: Receiver, event_type: str, batch_public: str) -> Received:
    """The one request the receiver got, unwrapped by the SDK as ``event_type``."""
    wait_until(lambda: bool(receiver.requests()), 20, f"{event_type} at the receiver")
    (got,) = receiver.requests()
    assert got.refused is None, got.refused
    event = SDK.webhooks.unwrap(got.body, got.headers)
    assert (event.type, event.data.id) == (event_type, batch_public)
    assert event.id == got.headers["webhook-id"] and event.id.startswith("evt_")
    return got


def assert_logs_keep_secrets(*logs: str) -> None:
    for log in logs:
        assert SECRET not in log and SECRET.removeprefix("whsec_") not in log


def test_an_attempt_is_claimed_by_one_sweep_and_sent_by_one_task(
    settings: Settings, receiver: Receiver
) -> None:
    settings = hooked(settings, receiver.start())
    url = settings.database_url
    assert url is not None
    with session_scope(url) as session:
        batch = Batch(name="b", source="api", status="completed")
        session.add(batch)
        session.flush()
        event_id = store.new_id("evt_")
        session.add(WebhookEvent(id=event_id, type="batch.completed", batch_id=batch.id))
        stale = WebhookEvent(id=store.new_id("evt_"), type="batch.failed", batch_id=batch.id)
        session.add(stale)
        session.flush()
        # Past the 72 hours of retries: never claimed again.
        stale.created_at = stale.created_at - webhooks.RETRY_FOR
    # Two sweeps at once: the second skips the row the first holds, without waiting.
    with transaction(url) as first:
        assert webhooks.claim_due(first) == [(event_id, 0)]
        with transaction(url) as second:
            assert webhooks.claim_due(second) == []
    # Committed, the claim keeps it from the next sweeps for CLAIM_S.
    with transaction(url) as later:
        assert webhooks.claim_due(later) == []
    # The task's message delivered twice (a redelivery, or two sweeps' claims): one POST.
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(webhooks.deliver(settings, event_id, 0)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["delivered", "skipped"]
    assert len(receiver.requests()) == 1
    assert webhooks.deliver(settings, event_id, 1) == "skipped"  # delivered: nothing more
    rows = {row.id: row for row in event_rows(settings)}
    assert (rows[event_id].attempts, rows[event_id].last_status) == (1, 200)
    assert rows[stale.id].attempts == 0


def test_attempts_stop_72_hours_after_the_event(
    settings: Settings, receiver: Receiver, events: Callable[[], list[str]]
) -> None:
    settings = hooked(
        settings, receiver.start(), webhook_backoff_base=10.0, webhook_backoff_max=10.0
    )
    receiver.status = 503
    url = settings.database_url
    assert url is not None
    with session_scope(url) as session:
        batch = Batch(name="b", source="api", status="failed")
        session.add(batch)
        session.flush()
        # One second of the 72 hours left: the next attempt (5-10 s away) would be past them.
        almost = func.now() - webhooks.RETRY_FOR + dt.timedelta(seconds=1)
        event = WebhookEvent(
            id=store.new_id("evt_"), type="batch.failed", batch_id=batch.id, created_at=almost
        )
        session.add(event)
    assert webhooks.deliver(settings, event.id, 0) == "failed"
    assert len(receiver.requests()) == 1
    assert any("event=webhook_abandoned" in line for line in events())
    (row,) = event_rows(settings)
    assert (row.attempts, row.last_status, row.delivered_at) == (1, 503, None)
    with transaction(url) as tx:
        assert webhooks.claim_due(tx) == []


def test_a_batch_of_no_requests_ends_at_once_with_its_event(
    settings: Settings, receiver: Receiver
) -> None:
    settings = hooked(settings, receiver.start())
    batch = api.submit_batch([], settings=settings)
    assert batch.progress().status == "completed"
    (row,) = event_rows(settings)
    assert (row.type, row.batch_id, row.attempts) == ("batch.completed", batch.id, 0)
    assert webhooks.deliver(settings, row.id, 0) == "delivered"  # as the worker's task does
    the_event(receiver, "batch.completed", batch_public_id(batch.id))


def test_a_completed_batch_sends_batch_completed_once(
    settings: Settings, simulator: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    settings = hooked(settings, receiver.start())
    # Two workers, each sweeping every 0.2 s: the claim must keep them from sending twice.
    workers = [WorkerProcess(settings, tmp_path / f"worker{i}.log", concurrency=4) for i in (1, 2)]
    try:
        for worker in workers:
            worker.wait_ready()
        batch = api.submit_batch([body(f"q{i}") for i in range(3)], settings=settings)
        got = the_event(receiver, "batch.completed", batch_public_id(batch.id))
        assert batch.progress().status == "completed"
        time.sleep(1.5)  # several sweeps of both workers later, still one request
        assert len(receiver.requests()) == 1
    finally:
        for worker in workers:
            worker.stop()
    (row,) = event_rows(settings)
    assert (row.id, row.type, row.batch_id) == (
        got.headers["webhook-id"],
        "batch.completed",
        batch.id,
    )
    assert (row.attempts, row.last_status, row.last_error) == (1, 200, None)
    assert row.delivered_at is not None
    logs = [worker.log() for worker in workers]
    assert sum(log.count("event=webhook_delivered") for log in logs) == 1
    assert_logs_keep_secrets(*logs)
    assert not any(receiver.path in log for log in logs)


def test_a_cancelled_batch_sends_batch_cancelled(
    settings: Settings, simulator: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    # One request a minute: the batch's other jobs wait for their slot until the cancel.
    settings = hooked(settings, receiver.start(), rpm=1)
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=4)
    try:
        worker.wait_ready()
        batch = api.submit_batch([body(f"q{i}") for i in range(3)], settings=settings)
        wait_until(lambda: batch.progress().succeeded == 1, 20, "the first answer")
        assert batch.cancel() == 2
        the_event(receiver, "batch.cancelled", batch_public_id(batch.id))
    finally:
        worker.stop()
    assert batch.progress().status == "cancelled"
    assert_logs_keep_secrets(worker.log())


def test_a_batch_whose_file_fails_validation_sends_batch_failed(
    settings: Settings, simulator: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    settings = hooked(settings, receiver.start())
    bad_role = line("x", body={"model": "kimi-k2-5", "messages": [{"role": "wizard"}]})
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl(line("ok"), bad_role))
    web = start_web(settings, tmp_path / "web.log")
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=4)
    try:
        worker.wait_ready()
        with openai.OpenAI(base_url=f"{web.url}/v1", api_key=WEB_KEY) as client:
            with path.open("rb") as fh:
                uploaded = client.files.create(file=fh, purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            the_event(receiver, "batch.failed", batch.id)
            assert client.batches.retrieve(batch.id).status == "failed"
    finally:
        worker.stop()
        web.stop(10)
    assert_logs_keep_secrets(worker.log(), web.log())


def test_a_batch_past_its_completion_window_sends_batch_expired(
    settings: Settings, simulator: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    # One request a minute and a 2 s window: two of the three requests cannot start in time.
    settings = hooked(settings, receiver.start(), rpm=1)
    assert settings.database_url is not None
    upload = Upload(
        settings.database_url, filename="late.jsonl", purpose="batch", max_bytes=1 << 20
    )
    upload.write(jsonl(*(line(f"q{i}") for i in range(3))))
    file = upload.finish()
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=4)
    try:
        worker.wait_ready()
        batch = api.create_file_batch(
            file.id, endpoint="/v1/chat/completions", completion_window="2s", settings=settings
        )
        the_event(receiver, "batch.expired", batch_public_id(batch.id))
    finally:
        worker.stop()
    progress = batch.progress()
    assert progress.status == "expired"
    assert (progress.succeeded, progress.cancelled) == (1, 2)


def test_a_receiver_down_longer_than_the_tolerance_still_gets_a_verifiable_event(
    settings: Settings, simulator: Simulator, tmp_path: Path
) -> None:
    """Refused connections, then 503s, for longer than the receiver's tolerance: the
    attempt that succeeds is signed at its own time, so it still verifies."""
    tolerance = 1  # seconds; the SDK's default is 300, the outage below lasts over 2
    receiver = Receiver(tolerance=tolerance)  # not listening yet
    settings = hooked(settings, receiver)
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=4)
    try:
        worker.wait_ready()
        batch = api.submit_batch([body("q")], settings=settings)

        def refused_twice() -> bool:
            return worker.log().count('error="ConnectError') >= 2

        wait_until(refused_twice, 20, "two refused attempts")
        (row,) = event_rows(settings)
        assert row.delivered_at is None and row.last_status is None
        assert row.last_error is not None and row.last_error.startswith("ConnectError")
        receiver.status = 503
        receiver.start()

        def down_long_enough() -> bool:
            got = receiver.requests()
            return len(got) >= 2 and time.time() - got[0].at > tolerance + 1

        wait_until(down_long_enough, 20, "503s for longer than the tolerance")
        (row,) = event_rows(settings)
        assert (row.last_status, row.last_error, row.delivered_at) == (503, None, None)
        receiver.status = 200
        wait_until(lambda: receiver.requests()[-1].answered == 200, 20, "a 200")
        time.sleep(1.0)  # no attempt after the 200
    finally:
        worker.stop()
        receiver.stop()
    got = receiver.requests()
    first, last = got[0], got[-1]
    assert [r.answered for r in got] == [503] * (len(got) - 1) + [200]
    # Every attempt is the same event (one id, one body), signed at its own time...
    assert {r.headers["webhook-id"] for r in got} == {first.headers["webhook-id"]}
    assert {r.body for r in got} == {first.body}
    assert int(last.headers["webhook-timestamp"]) - int(first.headers["webhook-timestamp"]) > (
        tolerance
    )
    # ... so each verified on arrival, the last when the first one's signature had expired.
    assert [r.refused for r in got] == [None] * len(got)
    SDK.webhooks.unwrap(last.body, last.headers)  # the SDK's own 5 minutes
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        SDK.webhooks.verify_signature(first.body, first.headers, tolerance=tolerance)
    event = SDK.webhooks.unwrap(last.body, last.headers)
    assert (event.type, event.data.id) == ("batch.completed", batch_public_id(batch.id))
    (row,) = event_rows(settings)
    log = worker.log()
    assert row.attempts == log.count('error="ConnectError') + len(got)
    assert (row.last_status, row.last_error) == (200, None)
    assert row.delivered_at is not None
    assert log.count("event=webhook_failed") == row.attempts - 1
    assert log.count("event=webhook_delivered") == 1
    assert_logs_keep_secrets(log)
    assert receiver.path not in log
