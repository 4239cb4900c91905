"""Budgets with real workers against the simulator: a batch never spends past its budget,
stops close to it, pauses with its reason, and goes on when the budget is raised."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from devstack.simulator import Simulator, SimulatorConfig
from jobs import api, budget, daily_budget, store
from jobs.budget import Budget
from jobs.circuit import KeyCircuit
from jobs.connections import celery_app, redis_client
from jobs.daily_budget import DailyBudgetError
from jobs.db import session_scope, transaction
from jobs.dispatch import dispatch
from jobs.models import Attempt, Batch, Job
from jobs.pricing import Price
from jobs.settings import Settings
from jobs.validation import ValidationError, check_request
from tests.support import (
    TEST_KEY,
    WorkerProcess,
    jsonl,
    line,
    make_settings,
    run_cli,
    wait_until,
)
from worker.client import ModelClient, default_timeout
from worker.pool import Pool
from worker.runner import Runner
from worker.throttle import Throttle, no_history

pytestmark = pytest.mark.integration

MAX_TOKENS = 100
PRICE = Price(input=0.6, output=3.0)


@pytest.fixture
def slow_simulator() -> Iterator[Simulator]:
    """Calls of 0.2-0.6 s: several of a batch are on the wire when its budget runs low."""
    sim = Simulator(SimulatorConfig(key=TEST_KEY, latency_min=0.2, latency_max=0.6)).start()
    yield sim
    sim.stop()


@pytest.fixture
def settings(clean_db: str, redis_url: str, slow_simulator: Simulator) -> Settings:
    return make_settings(clean_db, redis_url, slow_simulator.url, price=PRICE)


def requests(n: int) -> list[dict[str, Any]]:
    return [
        line(
            f"r{i}",
            body={
                "model": "kimi-k2-5",
                "messages": [{"role": "user", "content": f"request {i}: " + "word " * 40}],
                "max_tokens": MAX_TOKENS,
            },
        )
        for i in range(n)
    ]


def ledger(db: str, batch_id: int) -> tuple[int, int, int, int]:
    """The batch's calls, unanswered calls, and prompt and completion tokens charged."""
    with session_scope(db) as s:
        calls, unanswered, prompt, completion = s.execute(
            select(
                func.count(),
                func.count().filter(Attempt.http_status.is_(None)),
                func.coalesce(func.sum(Attempt.prompt_tokens), 0),
                func.coalesce(func.sum(Attempt.completion_tokens), 0),
            )
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.batch_id == batch_id)
        ).one()
    return calls, unanswered, prompt, completion


def worst_of_any_job(db: str, batch_id: int) -> tuple[int, float]:
    """The largest worst case, tokens and dollars, of one of the batch's jobs: its raw
    prompt estimate (above the calibrated one on this simulator) plus max_tokens."""
    with session_scope(db) as s:
        est = s.execute(
            select(func.max(Job.est_prompt_tokens)).where(Job.batch_id == batch_id)
        ).scalar_one()
    return est + MAX_TOKENS, PRICE.usd(est, MAX_TOKENS)


def paused_reason(db: str, batch_id: int) -> str | None:
    with session_scope(db) as s:
        reason: str | None = s.execute(
            select(Batch.paused_reason).where(Batch.id == batch_id)
        ).scalar_one()
        return reason


def queued(db: str, batch_id: int) -> int:
    with session_scope(db) as s:
        count: int = s.execute(select(Batch.queued).where(Batch.id == batch_id)).scalar_one()
        return count


def test_a_token_budget_pauses_the_batch_near_it_and_a_raise_resumes_it(
    settings: Settings, slow_simulator: Simulator, tmp_path: Path
) -> None:
    db = settings.database_url
    assert db is not None
    limit = 1_500
    batch = api.submit_batch(
        requests(30), name="budgeted", budget=Budget(tokens=limit), settings=settings
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=8)
    try:
        worker.wait_ready()
        wait_until(lambda: paused_reason(db, batch.id) is not None, 60, "the budget's pause")
        wait_until(lambda: ledger(db, batch.id)[1] == 0, 30, "calls on the wire answered")
        calls, _, prompt, completion = ledger(db, batch.id)
        worst, _ = worst_of_any_job(db, batch.id)
        # Never past the budget, and stopped by no more than one call's worst case.
        assert limit - worst <= prompt + completion <= limit, (prompt, completion, worst)
        assert 0 < calls < 30
        # The jobs its workers held go back to the queue.
        wait_until(lambda: batch.progress().running == 0, 10, "held jobs handed back")
        progress = batch.progress()
        assert progress.status == "in_progress"
        assert progress.queued == 30 - progress.succeeded
        reason = paused_reason(db, batch.id)
        assert reason is not None and reason.startswith("budget reached"), reason
        # The reason reaches status, the Batches API's shape and the --wait line.
        shown = run_cli(settings, "status", str(batch.id))
        assert shown.returncode == 0, shown.stderr
        assert f"paused: {reason}" in shown.stdout
        assert f"budget: {prompt + completion:,} tokens spent of {limit:,} tokens" in shown.stdout
        as_json = json.loads(run_cli(settings, "status", str(batch.id), "--json").stdout)
        assert as_json["budget"]["spent_tokens"] == prompt + completion
        assert as_json["paused"] == reason
        # Paused, nothing more is called: its jobs stay queued, unpublished.
        calls_then = slow_simulator.stats().calls
        time.sleep(1.0)  # five dispatcher sweeps
        assert slow_simulator.stats().calls == calls_then
        assert queued(db, batch.id) == progress.queued
        raised = run_cli(settings, "budget", str(batch.id), "--tokens", "1000000")
        assert raised.returncode == 0, raised.stderr
        assert "its calls go on" in raised.stdout
        final = batch.wait(timeout=90)
        assert (final.status, final.succeeded) == ("completed", 30)
        assert paused_reason(db, batch.id) is None
    finally:
        worker.stop()
    assert "event=batch_paused" in worker.log()


def test_three_processes_racing_for_the_last_of_a_dollar_budget(
    clean_db: str, redis_url: str, tmp_path: Path
) -> None:
    # Calls of 2 s: the first wave is all on the wire at once, each at its worst case.
    sim = Simulator(SimulatorConfig(key=TEST_KEY, latency_min=2.0, latency_max=2.0)).start()
    # Turns of 0.1 ms: the throttle's pace does not space the workers' admissions apart.
    settings = make_settings(clean_db, redis_url, sim.url, price=PRICE, rpm=600_000)
    lines = requests(90)
    limits = api.request_limits(settings)
    worst = max(
        PRICE.usd(check_request(x["body"], limits).est_prompt_tokens, MAX_TOKENS) for x in lines
    )
    limit = round(worst * 20.5, 8)  # twenty calls at their worst, not twenty-one
    workers = [
        WorkerProcess(settings, tmp_path / f"worker-{i}.log", concurrency=20) for i in range(3)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        # Submitted once all three listen, so that 60 threads race from the first call.
        batch = api.submit_batch(lines, name="race", budget=Budget(usd=limit), settings=settings)
        wait_until(lambda: sim.stats().calls >= 1, 30, "the first call")
        time.sleep(1.0)  # the first wave has started; none of it is answered yet
        first_wave = ledger(clean_db, batch.id)[1]
        wait_until(lambda: paused_reason(clean_db, batch.id) is not None, 90, "the pause")
        wait_until(lambda: ledger(clean_db, batch.id)[1] == 0, 30, "calls on the wire answered")
    finally:
        for worker in workers:
            worker.stop()
        sim.stop()
    # While none was answered, the calls on the wire fit the budget at their worst case.
    assert first_wave == 20
    calls, _, prompt, completion = ledger(clean_db, batch.id)
    spent = PRICE.usd(prompt, completion)
    assert limit - worst <= spent <= limit, (spent, limit, worst, calls)
    # The processes raced: the batch row's lock, not one process alone, kept them within it.
    assert sum("event=succeeded" in w.log() for w in workers) >= 2
    with session_scope(clean_db) as s:
        standing = budget.standing(s, batch.id, settings.price_for)
    assert standing.spent.usd == pytest.approx(spent)
    assert standing.paused_reason is not None and "$" in standing.paused_reason


def test_an_unanswered_call_counts_at_its_worst_case_until_its_answer(settings: Settings) -> None:
    db = settings.database_url
    assert db is not None
    batch = api.submit_batch(requests(1), name="one", budget=Budget(tokens=500), settings=settings)
    with session_scope(db) as s:
        job_id = s.execute(select(Job.id).where(Job.batch_id == batch.id)).scalar_one()
    with transaction(db) as tx:
        assert store.claim(tx, job_id, lease_s=60) is not None
        number = store.begin_attempt(
            tx, job_id, lease_s=60, est_prompt_tokens=70, max_tokens=100, worst_prompt_tokens=80
        )
        assert number is not None
        assert budget.spend(tx, batch.id, settings.price_for) == budget.Spend(
            180, PRICE.usd(80, 100)
        )
        # A second call of 400 at worst does not fit while the first is on the wire...
        call = budget.worst_case("kimi-k2-5", 300, 100, settings.price_for)
        assert budget.admit(tx, batch.id, call, settings.price_for).verdict == "wait"
        store.finish_attempt(tx, job_id, number, latency_ms=5, http_status=200, usage=(50, 20, 70))
        # ...and fits once its answer freed all but the 70 tokens it used.
        assert budget.spend(tx, batch.id, settings.price_for).tokens == 70
        assert budget.admit(tx, batch.id, call, settings.price_for).verdict == "fits"
        bigger = budget.worst_case("kimi-k2-5", 400, 100, settings.price_for)
        admission = budget.admit(tx, batch.id, bigger, settings.price_for)
    # With nothing on the wire, a call that does not fit pauses the batch.
    assert admission.verdict == "paused"
    assert admission.reason == (
        "budget reached: 70 tokens spent of 500 tokens, and the next call may take 500 tokens more"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--budget-tokens", "-5"],
            "batch-infer: error: --budget-tokens: must be above 0, got '-5'",
        ),
        (
            ["--budget-tokens", "lots"],
            "batch-infer: error: --budget-tokens: must be a whole number of tokens, got 'lots'",
        ),
        (
            ["--budget-usd", "nan"],
            "batch-infer: error: --budget-usd: must be a number of US dollars, got 'nan'",
        ),
        (
            ["--budget-tokens", "120"],
            "batch-infer: error: line 2: body.max_tokens: one call of it may take",
        ),
    ],
)
def test_a_bad_budget_is_one_line_and_stores_nothing(
    settings: Settings, tmp_path: Path, flags: list[str], message: str
) -> None:
    path = tmp_path / "batch.jsonl"
    small = line(
        "small",
        body={
            "model": "kimi-k2-5",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10,
        },
    )
    path.write_bytes(jsonl(small, *requests(1)))
    done = run_cli(settings, "submit", str(path), *flags)
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1
    assert settings.database_url is not None
    with session_scope(settings.database_url) as s:
        assert s.execute(select(func.count()).select_from(Batch)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 0


def test_a_dollar_budget_needs_a_price(clean_db: str, redis_url: str, tmp_path: Path) -> None:
    unpriced = make_settings(clean_db, redis_url, "http://127.0.0.1:9")
    with pytest.raises(ValidationError) as caught:
        api.submit_batch(requests(2), budget=Budget(usd=5), settings=unpriced)
    assert str(caught.value).startswith(
        "request 1: body.model: a dollar budget needs a price for kimi-k2-5: "
        "set INFERENCE_PRICE_INPUT and INFERENCE_PRICE_OUTPUT (USD per million tokens)"
    ), str(caught.value)


def test_the_daily_budget_stops_every_batch_and_enqueue_until_midnight_utc(
    clean_db: str, redis_url: str, simulator: Simulator
) -> None:
    with session_scope(clean_db) as s:
        today: dt.date = s.execute(select(func.timezone("UTC", func.now()))).scalar_one().date()
    # The day's clock, moved by the test: calls are stamped by the database's own time.
    clock = [dt.datetime.combine(today, dt.time(23, 59), dt.UTC)]
    settings = make_settings(
        clean_db, redis_url, simulator.url, daily_budget_tokens=1_000, clock=lambda: clock[0]
    )
    first = api.submit_batch(requests(10), name="first", settings=settings)
    second = api.submit_batch(requests(10), name="second", settings=settings)
    with session_scope(clean_db) as s:
        job_ids = list(s.execute(select(Job.id).order_by(Job.id)).scalars())
    redis = redis_client(redis_url)
    throttle = Throttle(
        redis, settings.bucket_name, rpm=settings.rpm, tpm=settings.tpm, seed=no_history
    )
    circuit = KeyCircuit(redis, settings.key_fingerprint, first_wait_s=1.0)
    client = ModelClient(
        settings.inference_url or "", settings.inference_key, timeout=default_timeout(2.0, 5.0)
    )
    pool = Pool.single(settings.model_id, client, throttle, circuit)
    runner = Runner(settings, lambda _model: pool)
    app = celery_app(settings)
    try:
        outcomes = [runner.run(job_id) for job_id in job_ids]
        ran = outcomes.count("succeeded")
        # Every batch stops at the same spent day, the first call that no longer fits.
        assert 0 < ran < 20 and outcomes == ["succeeded"] * ran + ["handed_back"] * (20 - ran)
        with session_scope(clean_db) as s:
            spent = daily_budget.spent_today(s, settings).tokens
            est = s.execute(select(func.max(Job.est_prompt_tokens))).scalar_one()
        assert 1_000 - (est + MAX_TOKENS) <= spent <= 1_000, spent
        reason = daily_budget.pause_reason(settings)
        day = f"{today:%Y-%m-%d}"
        assert reason is not None and reason.startswith(
            f"daily budget reached: {spent:,} tokens spent on {day} (UTC) of 1,000 tokens"
        ), reason
        assert dispatch(settings, app) == 0
        assert first.calls_paused() == reason == second.calls_paused()
        with pytest.raises(DailyBudgetError, match=r"^daily budget reached: "):
            api.enqueue([{"role": "user", "content": "now"}], settings=settings)
        # A raised limit resumes the day...
        raised = settings.replace(daily_budget_tokens=1_001)
        assert daily_budget.pause_reason(raised) is None
        # ...and so does midnight UTC, for the batches and for interactive jobs alike.
        clock[0] = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(0, 0, 5), dt.UTC)
        assert daily_budget.pause_reason(settings) is None
        assert dispatch(settings, app) == 20 - ran
        now = [{"role": "user", "content": "now"}]
        with pytest.raises(
            DailyBudgetError, match=r"^this request may take 4,\d{3} tokens of a budget of 1,000"
        ):
            api.enqueue(now, settings=settings)  # max_tokens 4096 by default: never fits
        interactive = api.enqueue(now, max_tokens=100, settings=settings)
        assert runner.run(interactive.id) == "succeeded"
        assert runner.run(job_ids[ran]) == "succeeded"
    finally:
        client.close()
        redis.close()


def test_a_cancel_ends_the_jobs_that_wait_for_budget(
    clean_db: str, redis_url: str, tmp_path: Path
) -> None:
    # Calls of 3 s, and a budget that fits two at their worst: the others wait for it.
    sim = Simulator(SimulatorConfig(key=TEST_KEY, latency_min=3.0, latency_max=3.0)).start()
    settings = make_settings(clean_db, redis_url, sim.url)
    lines = requests(10)
    est = check_request(lines[0]["body"], api.request_limits(settings)).est_prompt_tokens
    batch = api.submit_batch(
        lines, name="waiting", budget=Budget(tokens=2 * (est + MAX_TOKENS) + 10), settings=settings
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log", concurrency=8)
    try:
        worker.wait_ready()
        # Two on the wire, the others held by the worker, waiting for budget.
        wait_until(
            lambda: ledger(clean_db, batch.id)[0] == 2 and batch.progress().running >= 4,
            30,
            "jobs waiting for budget",
        )
        batch.cancel()
        final = batch.wait(timeout=30)
    finally:
        worker.stop()
        sim.stop()
    # The two calls on the wire end and are recorded; every waiting job ends cancelled.
    assert (final.status, final.succeeded, final.cancelled) == ("cancelled", 2, 8)
