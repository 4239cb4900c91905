"""The key circuit: a rejected key stops the calls, keeps the jobs queued, and heals."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from devstack.simulator import Simulator
from jobs import api, intake
from jobs.batchfile import BatchItem
from jobs.circuit import KeyCircuit, paused_reason
from jobs.connections import celery_app, redis_client
from jobs.db import session_scope
from jobs.dispatch import dispatch
from jobs.models import Job, JobStatus
from jobs.settings import Settings
from jobs.validation import CheckedRequest
from tests.integration.test_runner import Harness, body
from tests.support import make_settings

pytestmark = pytest.mark.integration


def make_batch(db: str, n: int) -> list[int]:
    items = [
        BatchItem(
            line=i + 1,
            custom_id=f"c{i}",
            request=CheckedRequest(
                body=body(f"q{i}"), model="kimi-k2-5", max_tokens=None, est_prompt_tokens=10
            ),
        )
        for i in range(n)
    ]
    with session_scope(db) as s:
        batch_id, _ = intake.create_batch(s, name="t", source="api", items=items)
        return list(
            s.execute(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)).scalars()
        )


@pytest.fixture
def wrong_key(clean_db: str, redis_url: str, simulator: Simulator) -> Iterator[Harness]:
    """A runner whose key the simulator does not accept (yet)."""
    h = Harness(
        make_settings(clean_db, redis_url, simulator.url, inference_key="wrong-key"), simulator
    )
    yield h
    h.close()


def test_circuit_scripts_open_probe_and_close(redis_url: str) -> None:
    circuit = KeyCircuit(redis_client(redis_url), "abc", first_wait_s=0.3)
    assert circuit.gate(1) == "closed" and circuit.state() is None
    wait = circuit.open("invalid key", 401, job_id=1)
    assert 0.0 < wait <= 0.3
    assert circuit.gate(1) == "open"
    assert circuit.claim_probe(2, lease_s=30) == -1  # not due yet
    # A second rejection from a call already in flight does not double the wait.
    circuit.open("invalid key", 401, job_id=3)
    state = circuit.state()
    assert state is not None and state.failures == 1 and state.status == 401
    time.sleep(0.35)
    assert circuit.claim_probe(2, lease_s=30) == 1
    assert circuit.gate(2) == "probe" and circuit.gate(1) == "open"
    assert circuit.claim_probe(4, lease_s=30) == -1  # the probe holds its lease
    # The probe is rejected again: reopened with the wait doubled.
    wait = circuit.open("invalid key", 401, job_id=2)
    assert 0.3 < wait <= 0.6
    state = circuit.state()
    assert state is not None and state.failures == 2
    time.sleep(wait + 0.05)
    assert circuit.claim_probe(5, lease_s=30) == 1
    assert not circuit.close(2)  # only the current probe closes it
    assert circuit.close(5)
    assert circuit.gate(5) == "closed" and circuit.claim_probe(6, lease_s=30) == 0


def first_rejected(harness: Harness) -> tuple[int, int]:
    """Two jobs of one batch, the first run once: the provider rejects the key, the circuit
    opens and the job goes back to the queue."""
    db = harness.settings.database_url
    assert db is not None
    first, second = make_batch(db, 2)
    assert harness.runner.run(first) == "handed_back"
    return first, second


def test_rejected_key_opens_the_circuit_and_keeps_jobs_queued(
    wrong_key: Harness, simulator: Simulator
) -> None:
    first, second = first_rejected(wrong_key)
    assert simulator.stats().calls == 1
    # The next job makes no call at all while the circuit is open.
    assert wrong_key.runner.run(second) == "handed_back"
    assert simulator.stats().calls == 1
    for job_id in (first, second):
        job = wrong_key.job(job_id)
        assert job.status == JobStatus.QUEUED and job.error_code is None
        assert (
            job.last_error is not None and "rejected the inference key (HTTP 401" in job.last_error
        )
        assert "wrong-key" not in job.last_error
    (attempt,) = wrong_key.attempts(first)
    assert (attempt.http_status, attempt.error_kind, attempt.total_tokens) == (401, "auth", 0)


def test_probe_after_the_key_is_fixed_closes_the_circuit(
    wrong_key: Harness, simulator: Simulator
) -> None:
    first, second = first_rejected(wrong_key)
    time.sleep(1.05)  # the harness circuit waits 1 s before its first probe
    # Still wrong: the probe is rejected, the job stays queued, the wait doubles.
    assert wrong_key.circuit.claim_probe(first, lease_s=30) == 1
    assert wrong_key.runner.run(first) == "handed_back"
    state = wrong_key.circuit.state()
    assert state is not None and state.failures == 2
    simulator.set_key("wrong-key")  # the key is fixed at the provider's side
    time.sleep(max(0.0, (state.retry_at - state.opened_at).total_seconds() - 1.0) + 1.1)
    assert wrong_key.circuit.claim_probe(second, lease_s=30) == 1
    assert wrong_key.runner.run(second) == "succeeded"
    assert wrong_key.circuit.state() is None
    assert wrong_key.runner.run(first) == "succeeded"  # calls flow again
    assert simulator.stats().calls == 4


def test_dispatcher_publishes_only_one_probe_while_open(clean_db: str, redis_url: str) -> None:
    settings = Settings(
        database_url=clean_db, redis_url=redis_url, inference_key="k", auth_retry_s=0.5
    )
    app = celery_app(settings)
    ids = make_batch(clean_db, 5)
    circuit = KeyCircuit(redis_client(redis_url), settings.key_fingerprint, first_wait_s=0.5)
    circuit.open("invalid key", 403, job_id=ids[0])
    assert dispatch(settings, app) == 0  # open and not due: nothing published
    time.sleep(0.55)
    assert dispatch(settings, app) == 1  # due: one probe
    assert dispatch(settings, app) == 0  # the probe's lease holds the rest back
    probe = int(redis_client(redis_url).hget(circuit.key, "probe_job") or 0)
    assert probe == ids[0]
    circuit.close(probe)
    assert dispatch(settings, app) == 4  # closed: everything else flows


def test_status_shows_why_calls_are_paused(clean_db: str, redis_url: str) -> None:
    settings = Settings(
        database_url=clean_db,
        redis_url=redis_url,
        inference_url="http://127.0.0.1:9",
        inference_key="k",
    )
    assert paused_reason(settings) is None
    KeyCircuit(redis_client(redis_url), settings.key_fingerprint, first_wait_s=60).open(
        "invalid key", 401, job_id=1
    )
    reason = paused_reason(settings)
    assert (
        reason is not None and "HTTP 401: invalid key" in reason and "fix INFERENCE_KEY" in reason
    )
    # An operator's shell without the key still sees it.
    assert paused_reason(settings.replace(inference_key="")) == reason
    # Another key's circuit is not this key's business.
    assert paused_reason(settings.replace(inference_key="other")) is None
    ids = make_batch(clean_db, 1)
    with session_scope(clean_db) as s:
        batch_id = s.get_one(Job, ids[0]).batch_id
    assert batch_id is not None
    assert api.get_batch(batch_id, settings=settings).calls_paused() == reason


def test_the_next_probe_is_due_in_redis_time(redis_url: str) -> None:
    circuit = KeyCircuit(redis_client(redis_url), "due", first_wait_s=2.0)
    assert circuit.due_in() == 0.0  # closed
    circuit.open("invalid key", 401, job_id=1)
    assert 1.5 < circuit.due_in() <= 2.0
    time.sleep(0.5)
    assert 1.0 < circuit.due_in() <= 1.5


def test_the_probe_calls_even_where_its_attachment_is_set_aside(
    wrong_key: Harness, simulator: Simulator
) -> None:
    _, second = first_rejected(wrong_key)  # opens the circuit, 1 s
    simulator.set_key("wrong-key")  # the key is fixed at the provider's side
    time.sleep(1.05)
    # A dispatcher makes the second job the probe, while this process still sets the
    # attachment aside (another job found the circuit open a moment before).
    assert wrong_key.circuit.claim_probe(second, lease_s=30) == 1
    (endpoint,) = wrong_key.pool.endpoints
    wrong_key.pool.set_aside(endpoint, 30.0)
    assert wrong_key.runner.run(second) == "succeeded"
    assert wrong_key.circuit.state() is None
