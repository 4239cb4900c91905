"""One job at a time through the runner: real Postgres, Redis and simulator over HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from devstack.simulator import Simulator, SimulatorConfig
from jobs import intake, store
from jobs.batchfile import BatchItem
from jobs.calibration import TRUSTED_SAMPLES, Calibrator
from jobs.circuit import KeyCircuit
from jobs.connections import redis_client
from jobs.constants import throttle_pause_key
from jobs.db import session_scope
from jobs.models import Attempt, Job, JobStatus
from jobs.settings import Settings
from jobs.validation import CheckedRequest
from tests.integration.throttle_helpers import entries, redis_now_ms, wait_until
from tests.support import TEST_KEY, backoff_range, backoff_waits, make_settings
from worker.client import ModelClient, default_timeout
from worker.pool import Pool
from worker.runner import Runner
from worker.runtime import Runtime
from worker.throttle import Throttle, no_history

pytestmark = pytest.mark.integration


def store_job(db: str, body: dict[str, Any], est: int = 20) -> int:
    checked = CheckedRequest(
        body=body, model=body.get("model", "kimi-k2-5"),
        max_tokens=body.get("max_tokens"), est_prompt_tokens=est,
    )  # fmt: skip
    with session_scope(db) as s:
        batch_id, _ = intake.create_batch(
            s, name="t", source="api", items=[BatchItem(line=1, custom_id="c1", request=checked)]
        )
        return s.execute(select(Job.id).where(Job.batch_id == batch_id)).scalar_one()


def body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "kimi-k2-5", "messages": [{"role": "user", "content": text}]} | extra


class Harness:
    def __init__(
        self, settings: Settings, sim: Simulator, transport: httpx.BaseTransport | None = None
    ) -> None:
        assert settings.redis_url and settings.inference_url
        self.settings = settings
        self.sim = sim
        self.redis = redis_client(settings.redis_url)
        self.client = ModelClient(
            settings.inference_url,
            settings.inference_key,
            timeout=default_timeout(2.0, 2.0),
            transport=transport,
        )
        self.throttle = Throttle(
            self.redis,
            settings.bucket_name,
            rpm=settings.rpm,
            tpm=settings.tpm,
            window_s=2.0,
            seed=no_history,
        )
        self.stop = threading.Event()
        self.circuit = KeyCircuit(self.redis, settings.key_fingerprint, first_wait_s=1.0)
        self.pool = Pool.single(settings.model_id, self.client, self.throttle, self.circuit)
        self.runner = Runner(settings, lambda _model: self.pool, stop=self.stop)

    def job(self, job_id: int) -> Job:
        assert self.settings.database_url
        with session_scope(self.settings.database_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def attempts(self, job_id: int) -> list[Attempt]:
        assert self.settings.database_url
        with session_scope(self.settings.database_url) as s:
            return list(
                s.execute(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number))
                .scalars()
                .all()
            )

    def close(self) -> None:
        self.client.close()
        self.redis.close()


@pytest.fixture
def harness(settings: Settings, simulator: Simulator) -> Iterator[Harness]:
    h = Harness(settings, simulator)
    yield h
    h.close()


def test_success_records_result_and_ledger_once(harness: Harness) -> None:
    assert harness.settings.database_url
    job_id = store_job(harness.settings.database_url, body(max_tokens=64, temperature=0.2))
    assert harness.runner.run(job_id) == "succeeded"
    job = harness.job(job_id)
    stats = harness.sim.stats()
    assert job.status == JobStatus.SUCCEEDED
    assert job.output_text and job.output_text.startswith("Simulated reply")
    assert job.finish_reason in {"stop", "length"}
    assert job.total_tokens == stats.total_tokens
    (attempt,) = harness.attempts(job_id)
    assert (attempt.http_status, attempt.total_tokens) == (200, stats.total_tokens)
    assert attempt.latency_ms is not None
    # A redelivered message for the finished job: no call, no ledger row.
    assert harness.runner.run(job_id) == "skipped"
    assert harness.sim.stats().calls == 1
    assert len(harness.attempts(job_id)) == 1


def test_tool_calls_and_reasoning_are_stored(harness: Harness) -> None:
    assert harness.settings.database_url
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    job_id = store_job(
        harness.settings.database_url,
        body("What's the weather in Portland?", tools=tools, tool_choice="required",
             extended_thinking={"enabled": True, "include_reasoning": True}),
    )  # fmt: skip
    assert harness.runner.run(job_id) == "succeeded"
    job = harness.job(job_id)
    assert job.finish_reason == "tool_calls"
    assert job.tool_calls and job.tool_calls[0]["function"]["name"] == "get_weather"
    assert job.reasoning_text


#: Most time a loaded machine may spend between two calls of a job besides its backoff:
#: the error's ledger row, the throttle and the next call's row.
BOOKKEEPING_S = 0.25


def test_server_errors_retry_then_fail_with_last_error(
    clean_db: str, redis_url: str, simulator: Simulator
) -> None:
    # A budget of 4 calls; backoffs of 0.125-0.25, 0.25-0.5 and 0.5-1 s between them.
    base, cap = 0.25, 1.0
    settings = make_settings(
        clean_db, redis_url, simulator.url, max_attempts=4, backoff_base=base, backoff_max=cap
    )
    h = Harness(settings, simulator)
    try:
        job_id = store_job(clean_db, body())
        simulator.force_status(503, 30)
        assert h.runner.run(job_id) == "failed"
        job = h.job(job_id)
        assert job.status == JobStatus.FAILED
        assert job.error_code == "server_error" and job.last_error and "503" in job.last_error
        attempts = h.attempts(job_id)
        # The whole budget, each call a retryable error, and no more calls than rows.
        assert [(a.http_status, a.error_kind) for a in attempts] == [(503, "server_error")] * 4
        assert simulator.stats().calls == 4
        waits = backoff_waits([(a.started_at, a.latency_ms or 0) for a in attempts])
        for failures, waited in enumerate(waits, start=1):
            shortest, longest = backoff_range(failures, base=base, cap=cap)
            assert shortest <= waited <= longest + BOOKKEEPING_S, (failures, waits)
    finally:
        h.close()


def test_transient_failure_then_success(
    clean_db: str, redis_url: str, simulator: Simulator
) -> None:
    # The provider fails until it has failed a call of ours, not for a time that could
    # be over before the first call: the job is called at least twice. The first backoff
    # (0.2 to 0.4 s) leaves time to end the failures before the next call.
    h = Harness(make_settings(clean_db, redis_url, simulator.url, backoff_base=0.4), simulator)
    try:
        job_id = store_job(clean_db, body())
        simulator.force_status(500, 30)
        outcome: list[str] = []
        runner = threading.Thread(target=lambda: outcome.append(h.runner.run(job_id)))
        runner.start()
        wait_until(lambda: simulator.stats().server_errors >= 1)
        simulator.force_status(500, 0)
        runner.join(30)
        assert outcome == ["succeeded"]
        statuses = [a.http_status for a in h.attempts(job_id)]
        assert len(statuses) >= 2, statuses  # something was retried
        assert statuses[-1] == 200 and all(s == 500 for s in statuses[:-1]), statuses
        assert [c.status for c in simulator.calls()] == statuses
    finally:
        h.close()


def test_a_hang_past_the_read_timeout_ends_as_a_timeout(clean_db: str, redis_url: str) -> None:
    # The provider hangs 1.5 s before answering its own 504; the worker's read timeout,
    # set like INFERENCE_READ_TIMEOUT, is 0.4 s. The worker's own client (the runtime's).
    hang_s, read_timeout = 1.5, 0.4
    sim = Simulator(SimulatorConfig(key=TEST_KEY, hang_rate=1.0, hang_seconds=hang_s)).start()
    settings = make_settings(clean_db, redis_url, sim.url, read_timeout=read_timeout,
                             max_attempts=2)  # fmt: skip
    runtime = Runtime(settings)
    try:
        job_id = store_job(clean_db, body())
        assert runtime.runner.run(job_id) == "failed"
        with session_scope(clean_db) as s:
            job = s.get(Job, job_id)
            assert job is not None
            assert job.error_code == "timeout", job.last_error
            rows = s.execute(
                select(Attempt.http_status, Attempt.error_kind, Attempt.latency_ms)
                .where(Attempt.job_id == job_id)
                .order_by(Attempt.number)
            ).all()
        # Given up at the read timeout, on the socket: no status, long before the 504.
        assert [(status, kind) for status, kind, _ in rows] == [(None, "timeout")] * 2
        assert all(read_timeout * 1000 <= ms < hang_s * 1000 for *_, ms in rows), rows
        # The provider found the connection closed when its 504 was ready: nobody read it.
        wait_until(lambda: all(c.delivered is not None for c in sim.calls()), timeout=5)
        assert [(c.outcome, c.delivered) for c in sim.calls()] == [("hang", False)] * 2
    finally:
        for endpoint in runtime.endpoints:
            endpoint.client.close()
        runtime.redis.close()
        sim.stop()


def test_client_error_fails_at_once(harness: Harness) -> None:
    assert harness.settings.database_url
    job_id = store_job(harness.settings.database_url, body())
    harness.sim.force_status(400, 30)
    assert harness.runner.run(job_id) == "failed"
    assert harness.job(job_id).error_code == "rejected"
    assert len(harness.attempts(job_id)) == 1


def test_invalid_stored_request_fails_without_a_call(harness: Harness) -> None:
    assert harness.settings.database_url
    bad = {"model": "kimi-k2-5", "messages": [{"role": "robot", "content": "x"}]}
    job_id = store_job(harness.settings.database_url, bad)
    assert harness.runner.run(job_id) == "failed"
    job = harness.job(job_id)
    assert job.error_code == "invalid_request" and job.last_error and "robot" in job.last_error
    assert harness.sim.stats().calls == 0


def test_request_larger_than_the_tpm_budget_fails_without_a_call(
    clean_db: str, redis_url: str, simulator: Simulator
) -> None:
    h = Harness(make_settings(clean_db, redis_url, simulator.url, tpm=500), simulator)
    try:
        job_id = store_job(clean_db, body("word " * 300, max_tokens=400), est=500)
        assert h.runner.run(job_id) == "failed"
        job = h.job(job_id)
        assert job.error_code in {"request_too_large", "invalid_request"}
        assert job.last_error and "tokens-per-minute" in job.last_error
        assert simulator.stats().calls == 0
    finally:
        h.close()


#: The reset a refused call is told to wait (``Retry-After``, whole seconds).
RESET_S = 1.0


def test_429_pauses_the_bucket_and_retries(clean_db: str, redis_url: str) -> None:
    # A provider that refuses every call for a second and says so in Retry-After alone,
    # with no x-ratelimit headers: only the pause the 429 sets can hold the other
    # callers of the bucket back (the headers would also add somebody else's usage).
    sim = Simulator(SimulatorConfig(key=TEST_KEY, retry_after=True)).start()
    h = Harness(make_settings(clean_db, redis_url, sim.url), sim)
    try:
        refused_job, other_job = store_job(clean_db, body("refused")), store_job(clean_db, body())
        # The pause is also watched for in Redis (every 5 ms), where every process sees it.
        pauses: set[bytes] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.005):
                pauses.add(h.redis.get(throttle_pause_key(h.settings.bucket_name)) or b"")

        outcomes: dict[int, str] = {}

        def run(job_id: int) -> None:
            outcomes[job_id] = h.runner.run(job_id)

        watcher = threading.Thread(target=watch)
        watcher.start()
        sim.force_status(429, RESET_S)
        first = threading.Thread(target=run, args=(refused_job,))
        first.start()
        try:
            # Once the 429 is in the ledger, the bucket was paused (if it ever is): another
            # job of the bucket starts now, inside the reset.
            wait_until(lambda: [a.http_status for a in h.attempts(refused_job)][:1] == [429])
            second = threading.Thread(target=run, args=(other_job,))
            second.start()
            second.join(30)
            first.join(30)
        finally:
            done.set()
            watcher.join()
        assert outcomes == {refused_job: "succeeded", other_job: "succeeded"}
        calls = sim.calls()
        refused = calls[0]
        assert (refused.client_request_id, refused.status) == (f"bi-{refused_job}-1", 429)
        # Seen from the provider: no call of the bucket reached it before the reset it was
        # told to wait, counted from the refused call's arrival (the pause counts from
        # when the worker read the answer, later still). 2 ms: Redis TIME is read in whole
        # ms, and both clocks run at the same rate on this one machine.
        later = [c.arrived_at - refused.arrived_at for c in calls[1:]]
        assert min(later) >= RESET_S - 0.002, later
        assert len(later) == 2, later  # each job called once more: nothing refused again
        assert pauses - {b""}, "the 429 never paused the bucket"
        statuses = [a.http_status for a in h.attempts(refused_job)]
        assert statuses == [429, 200]
        assert [a.http_status for a in h.attempts(other_job)] == [200]
        first_attempt = h.attempts(refused_job)[0]
        assert first_attempt.error_kind == "rate_limited" and first_attempt.total_tokens == 0
    finally:
        h.close()
        sim.stop()


def test_the_client_reports_a_request_sent_once_in_the_calling_thread(harness: Harness) -> None:
    sent: list[int] = []
    answer = harness.client.chat(body(), on_sent=lambda: sent.append(threading.get_ident()))
    assert answer.status == 200
    assert sent == [threading.get_ident()]


class _HeldTransport(httpx.BaseTransport):
    """Holds each request before the real transport writes it, like a thread kept
    waiting for the CPU while a whole window's calls start in its process."""

    def __init__(self, hold_s: float) -> None:
        self._inner = httpx.HTTPTransport()
        self._hold_s = hold_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        time.sleep(self._hold_s)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def test_a_call_held_before_its_bytes_go_out_moves_its_slot(
    settings: Settings, simulator: Simulator
) -> None:
    # The provider counts the call from its arrival; a slot left at the grant would let
    # the next window's calls in while this one is still in the provider's window.
    h = Harness(settings, simulator, transport=_HeldTransport(0.6))
    try:
        assert settings.database_url
        job_id = store_job(settings.database_url, body(max_tokens=16))
        before = redis_now_ms(h.redis)
        assert h.runner.run(job_id) == "succeeded"
        ((score, tokens, _),) = entries(h.redis, settings.bucket_name)
        assert score >= before + 600
        # The settle found the moved entry: it holds the real prompt plus max_tokens.
        (attempt,) = h.attempts(job_id)
        assert tokens == attempt.prompt_tokens + 16
    finally:
        h.close()


def test_shutdown_hands_the_job_back(harness: Harness) -> None:
    assert harness.settings.database_url
    job_id = store_job(harness.settings.database_url, body())
    harness.sim.force_status(503, 30)
    harness.stop.set()
    assert harness.runner.run(job_id) == "handed_back"
    job = harness.job(job_id)
    assert job.status == JobStatus.QUEUED and job.dispatched_at is None


def test_ledger_sum_matches_simulator_over_many_jobs(harness: Harness) -> None:
    assert harness.settings.database_url
    ids = [store_job(harness.settings.database_url, body(f"q{i}" * (i + 1))) for i in range(8)]
    for job_id in ids:
        assert harness.runner.run(job_id) == "succeeded"
    with session_scope(harness.settings.database_url) as s:
        ledger = s.execute(select(func.sum(Attempt.total_tokens))).scalar_one()
    assert ledger == harness.sim.stats().total_tokens


def test_bodies_are_logged_only_when_asked(
    clean_db: str, redis_url: str, simulator: Simulator, events: Callable[[], list[str]]
) -> None:
    seen = 0
    for log_bodies in (False, True):
        h = Harness(make_settings(clean_db, redis_url, simulator.url, log_bodies=log_bodies),
                    simulator)  # fmt: skip
        try:
            job_id = store_job(clean_db, body("a secret prompt"))
            assert h.runner.run(job_id) == "succeeded"
            lines = events()
            text = "\n".join(lines[seen:])
            seen = len(lines)
            assert "event=succeeded" in text
            assert ("a secret prompt" in text) is log_bodies
            assert ("Simulated reply" in text) is log_bodies
        finally:
            h.close()


def test_calibrated_reservation_learns_from_the_provider(
    clean_db: str, redis_url: str, simulator: Simulator, events: Callable[[], list[str]]
) -> None:
    h = Harness(make_settings(clean_db, redis_url, simulator.url), simulator)
    h.runner.calibrator = Calibrator(clean_db, clock=lambda: 1e9 * len(events()))
    try:
        prompt = body("word " * 400, max_tokens=10)
        reserved = []
        for _ in range(3):
            assert h.runner.run(store_job(clean_db, prompt)) == "succeeded"
            line = next(x for x in reversed(events()) if "event=attempt" in x)
            reserved.append(int(line.split("reserved_tokens=")[1].split()[0]))
        job = h.job(store_job(clean_db, prompt))  # prompt_tokens the simulator counts
        assert job.status == JobStatus.QUEUED
        charged = simulator.stats().prompt_tokens // 3
        # The raw estimate errs high; after one answer the reservation follows the provider.
        assert reserved[0] > reserved[-1] >= charged + 10
    finally:
        h.close()


def test_where_the_provider_charges_actual_usage_answers_are_reserved_at_their_share(
    clean_db: str, redis_url: str, simulator: Simulator, events: Callable[[], list[str]]
) -> None:
    """Under INFERENCE_TPM_CHARGE=actual a call reserves all of max_tokens until enough
    answers were seen, then the share of it they used; under ``reserve`` it always
    reserves all of it."""
    reserved: dict[str, list[int]] = {}
    for charge in ("actual", "reserve"):
        settings = make_settings(clean_db, redis_url, simulator.url, tpm_charge=charge)
        h = Harness(settings, simulator)
        h.runner.calibrator = Calibrator(clean_db, clock=lambda: 1e9 * len(events()))
        try:
            prompt = body("word " * 400, max_tokens=500)
            for _ in range(TRUSTED_SAMPLES + 1):
                assert h.runner.run(store_job(clean_db, prompt)) == "succeeded"
                line = next(x for x in reversed(events()) if "event=attempt" in x)
                reserved.setdefault(charge, []).append(
                    int(line.split("reserved_tokens=")[1].split()[0])
                )
        finally:
            h.close()
    actual, reserve = reserved["actual"], reserved["reserve"]
    # The same body every time: the simulator gives each the same counts.
    stats, calls = simulator.stats(), 2 * (TRUSTED_SAMPLES + 1)
    prompt_tokens, used = stats.prompt_tokens // calls, stats.completion_tokens // calls
    assert used < 100
    assert actual[0] >= prompt_tokens + 500
    assert prompt_tokens + used <= actual[-1] <= prompt_tokens + used * 1.1 + 10
    assert min(reserve) >= prompt_tokens + 500


def test_brief_outages_are_retried_not_fatal(
    harness: Harness, events: Callable[[], list[str]]
) -> None:
    failures = [redis.ConnectionError("gone"), redis.TimeoutError("slow")]

    def flaky() -> int:
        if failures:
            raise failures.pop(0)
        return 7

    assert harness.runner._through_outage(flaky) == 7
    assert sum("event=outage" in line for line in events()) == 2
    with pytest.raises(ValueError, match="not an outage"):
        harness.runner._through_outage(lambda: (_ for _ in ()).throw(ValueError("not an outage")))


def test_a_crash_after_the_claim_hands_the_job_back(harness: Harness) -> None:
    assert harness.settings.database_url
    job_id = store_job(harness.settings.database_url, body())

    def broken_pool(_model: str) -> Pool:
        raise RuntimeError("bug")

    runner = Runner(harness.settings, broken_pool)
    with pytest.raises(RuntimeError):
        runner.run(job_id)
    job = harness.job(job_id)
    assert (job.status, job.last_error) == (JobStatus.QUEUED, "worker error: RuntimeError")
    assert runner.held() == []
    assert harness.sim.stats().calls == 0


def test_the_jobs_of_one_message_are_claimed_together_and_run_side_by_side(
    clean_db: str, redis_url: str
) -> None:
    # Calls of a second each: only jobs running side by side have three on the wire at once.
    sim = Simulator(SimulatorConfig(key=TEST_KEY, latency_min=1.0, latency_max=1.0)).start()
    h = Harness(make_settings(clean_db, redis_url, sim.url), sim)
    try:
        done, leased, *fresh = (store_job(clean_db, body(f"job {n}")) for n in range(5))
        assert h.runner.run(done) == "succeeded"
        with session_scope(clean_db) as s:
            assert store.claim(s, leased, lease_s=600) is not None  # another worker's now
        outcomes: list[list[str]] = []
        message = [fresh[0], done, leased, *fresh[1:]]
        runner = threading.Thread(target=lambda: outcomes.append(h.runner.run_many(message)))
        runner.start()
        stats = sim.stats
        wait_until(lambda: stats().calls == 4 and stats().delivered == 1, timeout=5.0)
        runner.join(timeout=30)
        assert outcomes == [["succeeded", "skipped", "skipped", "succeeded", "succeeded"]]
        assert [h.job(job_id).status for job_id in fresh] == [JobStatus.SUCCEEDED] * 3
        assert h.job(leased).status == JobStatus.RUNNING
        assert sim.stats().calls == 4
    finally:
        h.close()
        sim.stop()


def test_a_crash_of_one_job_of_a_message_leaves_the_others_to_finish(harness: Harness) -> None:
    assert harness.settings.database_url
    db = harness.settings.database_url
    job_ids = [store_job(db, body(f"job {n}")) for n in range(3)]
    asked: list[str] = []
    lock = threading.Lock()

    def pool_for(model: str) -> Pool:
        with lock:
            asked.append(model)
            if len(asked) == 1:
                raise RuntimeError("a bug in one job")
        return harness.pool

    runner = Runner(harness.settings, pool_for, stop=harness.stop)
    with pytest.raises(RuntimeError, match="a bug in one job"):
        runner.run_many(job_ids)
    statuses = sorted(harness.job(job_id).status for job_id in job_ids)
    assert statuses == sorted([JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.SUCCEEDED])
    assert runner.held() == []
    assert harness.sim.stats().calls == 2
