"""``python -m bench.grouped_writes``: what a job's PostgreSQL writes cost the worker, one
transaction per job (as the runner writes them today) against one per group of jobs.

A measurement for the issue "Scale out", not a row of BENCHMARKS.md: the grouped
statements below are a sketch of the lead (claims taken in batches, results committed
together), written by hand, not the product's code. One thread, on a fresh database of
DATABASE_URL's server (the embedded one when unset); it prints the client CPU per job.

1. ``claim``: :func:`jobs.store.claim` per job, against one ``UPDATE … WHERE id = ANY``
   per group and one ``batch_moves`` row for it.
2. ``attempt``: :func:`jobs.store.begin_attempt` per job (the ledger row before the call).
3. ``result``: :func:`jobs.store.finish_attempt` and :func:`jobs.store.record_success`
   per job, against one ``UPDATE … FROM unnest(…)`` of the attempts and one of the jobs
   per group, and one ``batch_moves`` row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, text

from bench.stack import Servers
from jobs import migrate, store
from jobs.batchfile import BatchItem
from jobs.db import session_scope, transaction
from jobs.intake import create_batch
from jobs.store.counts import move_counts
from jobs.validation import CheckedRequest

_BODY = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
_ANSWER = {"id": "x", "choices": [{"message": {"content": "Simulated reply"}}]}
_USAGE = (10, 16, 26)


def _cpu_ms_per_job(jobs: int, work: Callable[[], None]) -> float:
    start = time.process_time()
    work()
    return 1000.0 * (time.process_time() - start) / jobs


def _groups(ids: Sequence[int], size: int) -> list[Sequence[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _claim_group(tx: Connection, batch_id: int, ids: Sequence[int]) -> None:
    claimed = tx.execute(
        text(
            "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, now()), "
            "lease_until = now() + interval '300 s' WHERE id = ANY(:ids) AND status = 'queued' "
            "RETURNING id, batch_id, custom_id, model, request, est_prompt_tokens, priority"
        ),
        {"ids": list(ids)},
    ).all()
    move_counts(tx, batch_id, "queued", "running", len(claimed))


#: One statement text for any group size (arrays, not a VALUES list), so that it is
#: prepared once, as the product's statements are.
_END_ATTEMPTS = text(
    "UPDATE attempts a SET latency_ms = v.l, http_status = 200, request_id = 'r', "
    "prompt_tokens = v.p, completion_tokens = v.c, total_tokens = v.t "
    "FROM unnest(CAST(:jobs AS bigint[]), CAST(:latency AS int[]), CAST(:prompt AS int[]), "
    "CAST(:completion AS int[]), CAST(:total AS int[])) AS v(j, l, p, c, t) "
    "WHERE a.job_id = v.j AND a.number = 1"
)
_END_JOBS = text(
    "UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_until = NULL, "
    "calling = false, response = CAST(v.r AS jsonb), output_text = 'Simulated reply', "
    "finish_reason = 'stop', prompt_tokens = 10, completion_tokens = 16, total_tokens = 26, "
    "request_id = 'r' FROM unnest(CAST(:jobs AS bigint[]), CAST(:answers AS text[])) AS v(j, r) "
    "WHERE jobs.id = v.j AND jobs.status = 'running' RETURNING jobs.id"
)


def _result_group(tx: Connection, batch_id: int, ids: Sequence[int]) -> None:
    n = len(ids)
    tx.execute(
        _END_ATTEMPTS,
        {
            "jobs": list(ids),
            "latency": [5] * n,
            "prompt": [_USAGE[0]] * n,
            "completion": [_USAGE[1]] * n,
            "total": [_USAGE[2]] * n,
        },
    )
    answers = [json.dumps(_ANSWER)] * n
    ended = tx.execute(_END_JOBS, {"jobs": list(ids), "answers": answers}).all()
    move_counts(tx, batch_id, "running", "succeeded", len(ended))


def measure(url: str, jobs: int, group: int) -> dict[str, float]:
    """Client CPU (ms) per job of each step, one transaction per job and per ``group``."""
    checked = CheckedRequest(body=_BODY, model="kimi-k2-5", max_tokens=16, est_prompt_tokens=20)
    items = [BatchItem(line=i + 1, custom_id=f"c{i}", request=checked) for i in range(jobs)]
    with session_scope(url) as session:
        batch_id, _ = create_batch(session, name="grouped-writes", source="api", items=items)
    with session_scope(url) as session:
        ids = list(
            session.execute(
                text("SELECT id FROM jobs WHERE batch_id = :b ORDER BY id"), {"b": batch_id}
            ).scalars()
        )
    single, grouped = ids[: jobs // 2], ids[jobs // 2 :]

    def each(step: Callable[[Connection, int], object], of: Sequence[int]) -> Callable[[], None]:
        def run() -> None:
            for job_id in of:
                with transaction(url) as tx:
                    step(tx, job_id)

        return run

    def groups(step: Callable[[Connection, int, Sequence[int]], None]) -> Callable[[], None]:
        def run() -> None:
            for chunk in _groups(grouped, group):
                with transaction(url) as tx:
                    step(tx, batch_id, chunk)

        return run

    def claim(tx: Connection, job_id: int) -> object:
        return store.claim(tx, job_id, lease_s=300)

    def attempt(tx: Connection, job_id: int) -> object:
        return store.begin_attempt(
            tx, job_id, lease_s=300, attachment="INFERENCE", key_hash="bench"
        )

    def result(tx: Connection, job_id: int) -> object:
        store.finish_attempt(
            tx,
            job_id,
            1,
            latency_ms=5,
            http_status=200,
            request_id="r",
            usage=_USAGE,
            ends_job=True,
        )
        return store.record_success(
            tx,
            job_id,
            request_id="r",
            response=_ANSWER,
            output_text="Simulated reply",
            reasoning_text=None,
            tool_calls=None,
            finish_reason="stop",
            usage=_USAGE,
        )

    found = {
        "claim_per_job": _cpu_ms_per_job(len(single), each(claim, single)),
        f"claim_per_{group}": _cpu_ms_per_job(len(grouped), groups(_claim_group)),
        "attempt_per_job": _cpu_ms_per_job(jobs, each(attempt, ids)),
        "result_per_job": _cpu_ms_per_job(len(single), each(result, single)),
        f"result_per_{group}": _cpu_ms_per_job(len(grouped), groups(_result_group)),
    }
    with session_scope(url) as session:
        left = session.execute(
            text("SELECT count(*) FROM jobs WHERE batch_id = :b AND status <> 'succeeded'"),
            {"b": batch_id},
        ).scalar_one()
    if left:
        raise RuntimeError(f"{left} jobs did not end succeeded: the measurement is void")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grouped_writes", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs in all (half each way)")
    parser.add_argument("--group", type=int, default=10, help="jobs per grouped transaction")
    args = parser.parse_args(argv)
    servers = Servers.resolve(redis_db=0)
    url = servers.create_database("bench_writes")
    try:
        migrate.upgrade(url)
        for step, ms in measure(url, args.jobs, args.group).items():
            print(f"{step}: {ms:.3f} ms CPU per job")
    finally:
        servers.drop_database(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
