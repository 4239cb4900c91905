"""Budgets: a batch's, and the deployment's per UTC day, with workers racing for the last
of it. Limits lifted and calls of 1-3 s, so that many calls are on the wire at once and
nothing but the budget's own lock keeps the workers apart."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bench.loads import bodies
from bench.measure import limits_text, processes, record_sim
from bench.rows import Row
from bench.scenarios_system import LIFTED_RPM, LIFTED_TPM, _lifted
from bench.stack import Run
from jobs import api, budget, daily_budget
from jobs.budget import Budget
from jobs.db import session_scope
from jobs.models import Job
from jobs.pricing import Price
from jobs.settings import Settings
from jobs.validation import check_request

#: Example prices (not Heroku's, which publishes none), so that dollars can be budgeted.
PRICE = Price(input=0.6, output=3.0)
PROMPT_TOKENS, MAX_TOKENS = 100, 200
REQUESTS = 2_000
#: The budget, in calls of a typical answer's cost: far fewer than the batch holds.
BUDGET_CALLS = 600
LATENCY = (1.0, 3.0)


def budget_race(run: Run, workers: int, daily: bool = False) -> Row:
    """A batch (or two, under a daily budget) that its budget stops part-way."""
    kind = "daily" if daily else "batch"
    row = Row(
        f"budget-{kind}-w{workers}",
        f"A {kind} budget raced for by {processes(workers)}",
    )
    row.description = (
        f"{REQUESTS:,} requests of ~{PROMPT_TOKENS} prompt tokens, max_tokens {MAX_TOKENS}, "
        f"calls of {LATENCY[0]:g}-{LATENCY[1]:g} s, limits lifted; "
        + (
            f"DAILY_BUDGET_USD of about {BUDGET_CALLS} answered calls, over two batches "
            "submitted together"
            if daily
            else f"the batch's budget_usd of about {BUDGET_CALLS} answered calls"
        )
        + f" (example prices {PRICE.input:g} / {PRICE.output:g} USD per million tokens)."
    )
    m = row.metrics
    m.update(workers=workers, limits=limits_text(LIFTED_RPM, LIFTED_TPM), requests=REQUESTS)
    typical = PRICE.usd(PROMPT_TOKENS, 40)  # the simulator answers 16-63 tokens
    limit = round(typical * BUDGET_CALLS, 6)
    env = [
        ("INFERENCE_PRICE_INPUT", f"{PRICE.input:g}"),
        ("INFERENCE_PRICE_OUTPUT", f"{PRICE.output:g}"),
    ]
    if daily:
        env.append(("DAILY_BUDGET_USD", f"{limit}"))
    spec = dataclasses.replace(_lifted(LATENCY), env=tuple(env))
    with run.stack(row.name, spec) as st:
        st.start_workers(workers)
        settings = st.settings
        given = None if daily else Budget(usd=limit)
        half = REQUESTS // 2
        payloads = [
            bodies(f"{kind}-a", half, PROMPT_TOKENS, MAX_TOKENS),
            bodies(f"{kind}-b", REQUESTS - half, PROMPT_TOKENS, MAX_TOKENS, start=half),
        ]
        if not daily:
            payloads = [payloads[0] + payloads[1]]
        t0 = time.monotonic()
        batches = [api.submit_batch(p, budget=given, settings=settings) for p in payloads]

        def stopped() -> str | None:
            if daily:
                return daily_budget.pause_reason(settings)
            return batches[0].budget().paused_reason

        deadline = t0 + 300.0
        while stopped() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        paused_after = time.monotonic() - t0
        ids = [b.id for b in batches]
        while time.monotonic() < deadline:
            # The calls on the wire at the pause are answered before the spend is read.
            with session_scope(st.database_url) as s:
                if not budget.on_the_wire(s, Job.batch_id.in_(ids)):
                    break
            time.sleep(0.2)
        calls_then = st.simulator.stats()["calls"]
        time.sleep(5.0)
        calls_after = st.simulator.stats()["calls"] - calls_then
        with session_scope(st.database_url) as s:
            spent = (
                daily_budget.spent_today(s, settings)
                if daily
                else budget.spend(s, batches[0].id, settings.price_for)
            )
        reason = stopped()
        record_sim(row, st.simulator)
    worst = _worst_call(settings, payloads)
    _record(row, limit, spent.usd or 0.0, worst, paused_after, calls_after, reason)
    return row


def _worst_call(settings: Settings, payloads: list[list[dict[str, Any]]]) -> float:
    """The most one call of the batch may cost: its raw prompt estimate plus max_tokens."""
    limits = api.request_limits(settings)
    return max(
        PRICE.usd(check_request(b, limits).est_prompt_tokens, MAX_TOKENS)
        for p in payloads
        for b in p
    )


def _record(
    row: Row,
    limit: float,
    spent_usd: float,
    worst: float,
    paused_after: float,
    calls_after: int,
    reason: str | None,
) -> None:
    m = row.metrics
    # Dollars as text: the report rounds numbers to two decimals, these are fractions of cents.
    m["budget_usd"] = f"${limit:.6f}"
    m["spent_usd"] = f"${spent_usd:.6f}"
    m["spent_vs_budget"] = round(spent_usd / limit, 4)
    m["one_call_worst_usd"] = f"${worst:.6f}"
    m["left_in_worst_calls"] = round((limit - spent_usd) / worst, 2)
    m["paused_after_s"] = round(paused_after, 1)
    m["calls_after_pause"] = calls_after
    m["pause_reason"] = reason
    row.target("paused", reason is not None, reason or "no pause within 300 s")
    row.target("spend <= budget", spent_usd <= limit, f"${spent_usd:.6f} of ${limit:.6f}")
    row.target(
        "spend >= budget - one call's worst case",
        spent_usd >= limit - worst,
        f"{(limit - spent_usd) / worst:.2f} worst-case calls left",
    )
    row.target("no call after the pause", calls_after == 0, f"{calls_after} calls")
