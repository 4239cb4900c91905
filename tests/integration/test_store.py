"""The job state machine and the dispatcher against the real Postgres and Redis."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session

from jobs import intake, reports, store
from jobs.batchfile import BatchItem
from jobs.connections import celery_app, redis_client
from jobs.constants import QUEUE_BULK, QUEUE_INTERACTIVE
from jobs.db import session_scope
from jobs.dispatch import JOBS_PER_MESSAGE, dispatch, window_for
from jobs.finalizing import finalize
from jobs.models import Attempt, Batch, BatchStatus, Job, JobStatus, Priority
from jobs.settings import Settings, TpmCharge
from jobs.validation import CheckedRequest
from tests.integration.throttle_helpers import entries, redis_now_ms
from tests.support import make_settings
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


def item(n: int) -> BatchItem:
    body: dict[str, Any] = {
        "model": "kimi-k2-5",
        "messages": [{"role": "user", "content": f"question {n}"}],
        "max_tokens": 50,
    }
    return BatchItem(
        line=n,
        custom_id=f"req-{n}",
        request=CheckedRequest(body=body, model="kimi-k2-5", max_tokens=50, est_prompt_tokens=10),
    )


def make_batch(db: str, n: int, **kwargs: Any) -> int:
    with session_scope(db) as session:
        batch_id, created = intake.create_batch(
            session, name="t", source="api", items=[item(i) for i in range(1, n + 1)], **kwargs
        )
    assert created
    return batch_id


def counters(db: str, batch_id: int) -> dict[str, Any]:
    """The batch's counters once the moves so far are folded, as the next sweep does."""
    with session_scope(db) as session:
        store.fold_moves(session)
    with session_scope(db) as session:
        b = session.get(Batch, batch_id)
        assert b is not None
        return {
            "status": b.status,
            "total": b.total,
            "queued": b.queued,
            "running": b.running,
            "succeeded": b.succeeded,
            "failed": b.failed,
            "cancelled": b.cancelled,
            "finished": b.finished_at is not None,
        }


def job_ids(db: str, batch_id: int) -> list[int]:
    with session_scope(db) as session:
        return list(
            session.execute(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id))
            .scalars()
            .all()
        )


def test_batch_counters_follow_every_transition(clean_db: str) -> None:
    batch_id = make_batch(clean_db, 3)
    a, b, c = job_ids(clean_db, batch_id)
    assert counters(clean_db, batch_id)["queued"] == 3
    with session_scope(clean_db) as s:
        assert store.claim(s, a, lease_s=60) is not None
        assert store.claim(s, b, lease_s=60) is not None
    assert counters(clean_db, batch_id) | {} == {
        "status": "in_progress", "total": 3, "queued": 1, "running": 2,
        "succeeded": 0, "failed": 0, "cancelled": 0, "finished": False,
    }  # fmt: skip
    with session_scope(clean_db) as s:
        assert store.record_success(
            s, a, response={"id": "x"}, output_text="hi", reasoning_text=None,
            tool_calls=None, finish_reason="stop", usage=(10, 5, 15),
        )  # fmt: skip
        assert store.record_failure(s, b, code="rejected", message="400 bad")
        assert store.cancel_batch(s, batch_id) == 1
    assert counters(clean_db, batch_id) == {
        "status": "cancelling", "total": 3, "queued": 0, "running": 0,
        "succeeded": 1, "failed": 1, "cancelled": 1, "finished": False,
    }  # fmt: skip
    # Nothing left in flight: the batch ends cancelled, with its output and error files.
    assert finalize(Settings(database_url=clean_db), batch_id) == BatchStatus.CANCELLED
    assert counters(clean_db, batch_id) == {
        "status": "cancelled", "total": 3, "queued": 0, "running": 0,
        "succeeded": 1, "failed": 1, "cancelled": 1, "finished": True,
    }  # fmt: skip
    assert c  # the cancelled one


def test_batch_completes_when_last_job_finishes(clean_db: str) -> None:
    batch_id = make_batch(clean_db, 2)
    for job_id in job_ids(clean_db, batch_id):
        with session_scope(clean_db) as s:
            store.claim(s, job_id, lease_s=60)
        assert counters(clean_db, batch_id)["status"] == "in_progress"
        with session_scope(clean_db) as s:
            store.record_failure(s, job_id, code="x", message="y")
    assert counters(clean_db, batch_id)["status"] == "finalizing"
    assert finalize(Settings(database_url=clean_db), batch_id) == BatchStatus.COMPLETED
    final = counters(clean_db, batch_id)
    assert final["status"] == "completed" and final["finished"] and final["failed"] == 2


def test_claim_is_exclusive_until_the_lease_expires(clean_db: str) -> None:
    (job_id,) = job_ids(clean_db, make_batch(clean_db, 1))
    with session_scope(clean_db) as s:
        assert store.claim(s, job_id, lease_s=300) is not None
    with session_scope(clean_db) as s:
        assert store.claim(s, job_id, lease_s=300) is None  # redelivered: leased elsewhere
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=func.now()))
    with session_scope(clean_db) as s:
        taken = store.claim(s, job_id, lease_s=300)
    assert taken is not None and taken.id == job_id
    with session_scope(clean_db) as s:
        store.record_success(
            s, job_id, response={}, output_text="", reasoning_text=None,
            tool_calls=None, finish_reason="stop", usage=(1, 1, 2),
        )  # fmt: skip
    with session_scope(clean_db) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=func.now()))
        assert store.claim(s, job_id, lease_s=300) is None  # finished: never again


def test_attempt_rows_are_numbered_and_written_before_the_call(clean_db: str) -> None:
    (job_id,) = job_ids(clean_db, make_batch(clean_db, 1))
    with session_scope(clean_db) as s:
        store.claim(s, job_id, lease_s=60)
        first = store.begin_attempt(s, job_id, lease_s=60)
        second = store.begin_attempt(s, job_id, lease_s=60)
        store.finish_attempt(
            s, job_id, 2, latency_ms=12, http_status=200, request_id="r", usage=(3, 4, 7)
        )
    assert (first, second) == (1, 2)
    with session_scope(clean_db) as s:
        rows = s.execute(select(Attempt).order_by(Attempt.number)).scalars().all()
        assert [(r.number, r.http_status, r.total_tokens) for r in rows] == [
            (1, None, 0),
            (2, 200, 7),
        ]
        store.record_failure(s, job_id, code="x", message="y")
        assert store.begin_attempt(s, job_id, lease_s=60) is None


def test_a_finished_job_keeps_sql_null_where_it_has_no_json(clean_db: str) -> None:
    """The per-job statements bind their values; ``None`` in a JSON column must stay SQL
    NULL, as ``values(column=None)`` wrote it, not become the JSON value ``null``."""
    ok, failed = job_ids(clean_db, make_batch(clean_db, 2))
    with session_scope(clean_db) as s:
        store.claim(s, ok, lease_s=60)
        store.claim(s, failed, lease_s=60)
        store.record_success(
            s, ok, response={"id": "x"}, output_text="hi", reasoning_text=None,
            tool_calls=None, finish_reason="stop", usage=(1, 1, 2),
        )  # fmt: skip
        store.record_failure(s, failed, code="x", message="y")
    with session_scope(clean_db) as s:
        rows = s.execute(
            select(
                Job.id,
                Job.tool_calls.is_(None),
                Job.error_body.is_(None),
                Job.response.is_(None),
                Job.reasoning_text.is_(None),
            ).order_by(Job.id)
        ).all()
    assert [tuple(row) for row in rows] == [
        (ok, True, True, False, True),
        (failed, True, True, True, True),
    ]


def test_jobs_of_one_batch_never_wait_on_its_row(clean_db: str) -> None:
    """Two workers claiming and ending jobs of one batch at once: neither waits for the
    other's transaction (each move is a row of its own, folded later), and a fold skips
    a batch whose row a cancel holds instead of waiting for it."""
    batch_id = make_batch(clean_db, 3)
    a, b, c = job_ids(clean_db, batch_id)
    with session_scope(clean_db) as first:
        assert store.claim(first, a, lease_s=60) is not None
        assert store.record_failure(first, a, code="x", message="y")
        # Still uncommitted: with the counters on the batch row this would wait.
        with session_scope(clean_db) as second:
            second.execute(text("SET LOCAL lock_timeout = '1s'"))
            assert store.claim(second, b, lease_s=60) is not None
    assert counters(clean_db, batch_id) | {} == {
        "status": "in_progress", "total": 3, "queued": 1, "running": 1,
        "succeeded": 0, "failed": 1, "cancelled": 0, "finished": False,
    }  # fmt: skip
    with session_scope(clean_db) as worker:
        assert store.claim(worker, c, lease_s=60) is not None  # a move left to fold
    with session_scope(clean_db) as cancelling:
        assert store.cancel_batch(cancelling, batch_id) == 2
        with session_scope(clean_db) as sweep:
            sweep.execute(text("SET LOCAL lock_timeout = '1s'"))
            assert store.fold_moves(sweep) == []  # the cancel holds the row: skipped
    # The cancel folded its own moves; nothing was counted twice or lost.
    assert counters(clean_db, batch_id) | {} == {
        "status": "cancelling", "total": 3, "queued": 0, "running": 0,
        "succeeded": 0, "failed": 1, "cancelled": 2, "finished": False,
    }  # fmt: skip


def test_requeue_stuck_and_retry_batch(clean_db: str) -> None:
    batch_id = make_batch(clean_db, 2)
    a, b = job_ids(clean_db, batch_id)
    with session_scope(clean_db) as s:
        store.claim(s, a, lease_s=60)
        store.claim(s, b, lease_s=60)
        s.execute(update(Job).where(Job.id == a).values(lease_until=func.now()))
    with session_scope(clean_db) as s:
        assert store.requeue_stuck(s) == 1
        store.record_failure(s, b, code="server_error", message="503")
    assert counters(clean_db, batch_id)["queued"] == 1
    with session_scope(clean_db) as s:
        assert store.retry_batch(s, batch_id) == 1
    state = counters(clean_db, batch_id)
    assert (state["queued"], state["failed"], state["status"]) == (2, 0, "in_progress")


def test_a_sweep_without_requeue_leaves_expired_leases_to_the_next_one(
    clean_db: str, redis_url: str
) -> None:
    settings = Settings(database_url=clean_db, redis_url=redis_url, dispatch_window=5)
    app = celery_app(settings)
    batch_id = make_batch(clean_db, 1)
    (job_id,) = job_ids(clean_db, batch_id)
    with session_scope(clean_db) as s:
        store.claim(s, job_id, lease_s=60)
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=func.now()))
    assert dispatch(settings, app, requeue=False) == 0
    assert counters(clean_db, batch_id)["running"] == 1
    assert dispatch(settings, app) == 1  # handed back, then published again
    assert counters(clean_db, batch_id)["queued"] == 1


def test_idempotency_key_creates_a_batch_once(clean_db: str) -> None:
    with session_scope(clean_db) as s:
        first, created = intake.create_batch(
            s, name="n", source="schedule", items=[item(1)], idempotency_key="k1"
        )
    with session_scope(clean_db) as s:
        again, created_again = intake.create_batch(
            s, name="n", source="schedule", items=[item(1), item(2)], idempotency_key="k1"
        )
    assert created and not created_again and first == again
    assert counters(clean_db, first)["total"] == 1


def _queued_jobs(redis_url: str) -> tuple[list[int], list[int]]:
    """The job ids of the messages waiting in the interactive and the bulk queues."""
    client = redis_client(redis_url)
    try:
        queues = [client.lrange(name, 0, -1) for name in (QUEUE_INTERACTIVE, QUEUE_BULK)]
    finally:
        client.close()
    found: tuple[list[int], list[int]] = ([], [])
    for ids, raw in zip(found, queues, strict=True):
        for message in raw:
            args = json.loads(base64.b64decode(json.loads(message)["body"]))[0]
            ids.extend(args[0] if isinstance(args[0], list) else args)
    return found


def _queue_lengths(redis_url: str) -> tuple[int, int]:
    """Jobs waiting in the interactive and the bulk queues."""
    interactive, bulk = _queued_jobs(redis_url)
    return len(interactive), len(bulk)


def test_dispatch_fills_the_window_and_publishes_each_job_once(
    clean_db: str, redis_url: str, events: Callable[[], list[str]]
) -> None:
    settings = Settings(
        database_url=clean_db, redis_url=redis_url, dispatch_window=5, dispatch_window_max=5
    )
    app = celery_app(settings)
    batch_id = make_batch(clean_db, 12)
    with session_scope(clean_db) as s:
        interactive = intake.create_job(s, item(99), priority=Priority.INTERACTIVE)
    assert dispatch(settings, app) == 6  # the interactive job skips the window
    queued = [line for line in events() if "event=queued" in line]
    assert len(queued) == 6
    assert f"event=queued job={interactive} status=queued queue=inference.interactive" in queued
    assert sum(f"batch={batch_id} " in line for line in queued) == 5
    assert _queue_lengths(redis_url) == (1, 5)
    assert dispatch(settings, app) == 0  # window full: nothing more
    with session_scope(clean_db) as s:
        store.claim(s, interactive, lease_s=60)
        first_bulk = s.execute(
            select(Job.id).where(Job.priority == Priority.BULK).order_by(Job.id).limit(1)
        ).scalar_one()
        store.claim(s, first_bulk, lease_s=60)
        store.record_failure(s, first_bulk, code="x", message="y")
    assert dispatch(settings, app) == 1  # one slot freed, one more published
    assert _queue_lengths(redis_url) == (1, 6)


def test_bulk_jobs_go_several_to_a_message_and_interactive_ones_alone(
    clean_db: str, redis_url: str
) -> None:
    settings = Settings(
        database_url=clean_db, redis_url=redis_url, dispatch_window=25, dispatch_window_max=25
    )
    make_batch(clean_db, 30)
    with session_scope(clean_db) as s:
        interactive = [
            intake.create_job(s, item(n), priority=Priority.INTERACTIVE) for n in (98, 99)
        ]
        bulk = (
            s.execute(select(Job.id).where(Job.priority == Priority.BULK).order_by(Job.id))
            .scalars()
            .all()
        )
    assert dispatch(settings, celery_app(settings)) == 27
    client = redis_client(redis_url)
    try:
        raw = {name: client.lrange(name, 0, -1) for name in (QUEUE_INTERACTIVE, QUEUE_BULK)}
    finally:
        client.close()
    carried = {
        name: [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in messages]
        for name, messages in raw.items()
    }
    # LPUSH: the first message published is the last in the list.
    assert carried[QUEUE_INTERACTIVE][::-1] == [[job_id] for job_id in interactive]
    per = JOBS_PER_MESSAGE
    assert carried[QUEUE_BULK][::-1] == [
        list(bulk[at : min(at + per, 25)]) for at in range(0, 25, per)
    ]


def _attempt(session: Session, job_id: int, age_s: float, latency_s: float | None) -> None:
    """An attempt row that started ``age_s`` ago and took ``latency_s`` (None: in flight)."""
    started = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, age_s)
    latency = None if latency_s is None else round(latency_s * 1000)
    session.execute(
        insert(Attempt).values(
            job_id=job_id, number=1, model="kimi-k2-5", started_at=started, latency_ms=latency
        )
    )


def test_the_dispatch_window_follows_the_calls_latency(clean_db: str, redis_url: str) -> None:
    # RPM 60: a minute's requests (60) plus RPM / 60 x the latency in flight, 10 to 120.
    settings = Settings(
        database_url=clean_db,
        redis_url=redis_url,
        rpm=60,
        dispatch_window=10,
        dispatch_window_max=120,
        read_timeout=300.0,
    )
    app = celery_app(settings)
    ids = job_ids(clean_db, make_batch(clean_db, 400))
    assert dispatch(settings, app) == 60  # no call seen yet: one minute's requests
    with session_scope(clean_db) as s:
        # 20 calls answered: 18 in 2 s and two in 40 s, so the 95th percentile is 40 s.
        for n, job_id in enumerate(ids[:20]):
            _attempt(s, job_id, age_s=60.0, latency_s=40.0 if n < 2 else 2.0)
        assert window_for(settings, s) == 60 + 40
        # A call in flight for 50 s counts by its age so far.
        _attempt(s, ids[20], age_s=50.0, latency_s=None)
        assert window_for(settings, s) == 60 + 50
        # One the read timeout has long given up on (its worker died) does not.
        _attempt(s, ids[21], age_s=400.0, latency_s=None)
        assert window_for(settings, s) == 60 + 50
        # A call in flight for 90 s would need 150: the window stops at its maximum.
        _attempt(s, ids[22], age_s=90.0, latency_s=None)
        assert window_for(settings, s) == 120
    # A sweep started by a job's end keeps the last full sweep's window; the next
    # full sweep reads the ledger again.
    assert dispatch(settings, app, requeue=False) == 0
    assert dispatch(settings, app) == 120 - 60
    fixed = settings.replace(dispatch_window_max=10)
    with session_scope(clean_db) as s:
        assert window_for(fixed, s) == 10


def test_concurrent_dispatchers_never_publish_the_same_job(clean_db: str, redis_url: str) -> None:
    settings = Settings(database_url=clean_db, redis_url=redis_url, dispatch_window=1000)
    make_batch(clean_db, 300)
    published: list[int] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            published.append(dispatch(settings, celery_app(settings)))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(published) == 300
    interactive, bulk = _queued_jobs(redis_url)
    assert not interactive and sorted(bulk) == sorted(set(bulk)) and len(bulk) == 300


def test_lost_messages_are_published_again(clean_db: str, redis_url: str) -> None:
    settings = Settings(
        database_url=clean_db, redis_url=redis_url, dispatch_window=10, dispatch_redeliver_after=1
    )
    app = celery_app(settings)
    make_batch(clean_db, 3)
    assert dispatch(settings, app) == 3
    redis_client(redis_url).flushdb()  # Redis lost everything
    with session_scope(clean_db) as s:
        s.execute(
            update(Job).values(dispatched_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 5))
        )
    assert dispatch(settings, app) == 3
    assert _queue_lengths(redis_url) == (0, 3)
    with session_scope(clean_db) as s:
        statuses = s.execute(select(Job.status)).scalars().all()
    assert statuses == [JobStatus.QUEUED] * 3


def ledger_for_reseeding(db: str) -> None:
    """Three calls just started: one answered (30 + 7 tokens), one refused, one in flight."""
    a, b, c = job_ids(db, make_batch(db, 3))
    with session_scope(db) as s:
        for job_id in (a, b, c):
            store.claim(s, job_id, lease_s=60)
            store.begin_attempt(s, job_id, lease_s=60)
        store.finish_attempt(s, a, 1, latency_ms=5, http_status=200, usage=(30, 7, 37))
        store.finish_attempt(s, b, 1, latency_ms=5, http_status=429, error_kind="rate_limited")


def test_recent_calls_for_reseeding_the_throttle(clean_db: str) -> None:
    ledger_for_reseeding(clean_db)
    with session_scope(clean_db) as s:
        calls = sorted(
            reports.recent_calls(s, window_s=60, model="kimi-k2-5"), key=lambda r: r.answered
        )
    assert [(r.answered, r.prompt_tokens, r.completion_tokens, r.max_tokens) for r in calls] == [
        (False, 10, 0, 50),  # in flight: the estimate stands in
        (True, 30, 7, 50),
    ]
    assert all(0 <= r.age_s < 60 for r in calls)
    with session_scope(clean_db) as s:
        assert reports.recent_calls(s, window_s=0.000001, model="kimi-k2-5") == []


@pytest.mark.parametrize(
    ("charge", "seeded"),
    [
        ("reserve", [10 + 50, 30 + 50]),  # prompt (estimated while in flight) + max_tokens
        ("actual", [30 + 7, 10 + 50]),  # answered: prompt + completion
    ],
)
def test_a_worker_rebuilds_a_lost_bucket_from_the_ledger(
    clean_db: str, redis_url: str, charge: TpmCharge, seeded: list[int]
) -> None:
    # The worker's own throttle, as after a Redis restart: its first call finds the
    # bucket uninitialised and logs the ledger's calls before anything is admitted.
    settings = make_settings(clean_db, redis_url, "http://127.0.0.1:9", tpm_charge=charge)
    runtime = Runtime(settings)
    try:
        before = redis_now_ms(runtime.redis)
        ledger_for_reseeding(clean_db)
        written = redis_now_ms(runtime.redis)
        time.sleep(0.5)  # the calls started half a second before Redis lost the bucket
        (endpoint,) = runtime.pool_for(settings.model_id).endpoints
        endpoint.throttle.release(endpoint.throttle.acquire(0, max_wait=0))
        log = entries(runtime.redis, settings.bucket_name)
    finally:
        for each in runtime.endpoints:
            each.client.close()
        runtime.redis.close()
    history = [(score, tokens) for score, tokens, member in log if member.startswith("s.")]
    assert sorted(tokens for _, tokens in history) == sorted(seeded)
    # Logged when they started, where the provider counts them, not when the bucket was
    # rebuilt (the ages are measured a few ms before they are logged; 1 ms: rounding).
    scores = [score for score, _ in history]
    assert all(before - 1 <= score <= written + 100 for score in scores), (before, written, scores)


def test_a_redis_that_lost_its_data_gets_every_queued_job_again_at_once(
    clean_db: str, redis_url: str, events: Callable[[], list[str]]
) -> None:
    # DISPATCH_REDELIVER_AFTER is far away: only the missing epoch key can explain it.
    settings = Settings(
        database_url=clean_db, redis_url=redis_url, dispatch_window=10, dispatch_redeliver_after=300
    )
    app = celery_app(settings)
    make_batch(clean_db, 3)
    assert dispatch(settings, app) == 3
    assert dispatch(settings, app) == 0
    redis_client(redis_url).flushdb()  # a Redis restart without persistence
    assert dispatch(settings, app) == 3
    assert _queue_lengths(redis_url) == (0, 3)
    assert any("event=republishing jobs=3" in line for line in events())
    assert dispatch(settings, app) == 0  # once only


def test_renewed_leases_outlive_their_first_term(clean_db: str) -> None:
    make_batch(clean_db, 2)
    with session_scope(clean_db) as s:
        first, second = s.execute(select(Job.id).order_by(Job.id)).scalars().all()
        store.claim(s, first, lease_s=0.5)
        store.claim(s, second, lease_s=0.5)
        store.renew_leases(s, [first], lease_s=60)
    time.sleep(0.6)
    with session_scope(clean_db) as s:
        assert store.requeue_stuck(s) == 1  # only the job nobody renewed
        assert s.get_one(Job, first).status == JobStatus.RUNNING
        assert s.get_one(Job, second).status == JobStatus.QUEUED
