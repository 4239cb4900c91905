"""``make demo`` (``python -m devstack demo``): a whole batch, end to end, on whatever the
settings point at.

With nothing set this starts the embedded PostgreSQL and Redis, the bundled
simulator and one worker process, runs a demo batch through them, prints a
summary and stops everything it started.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from sqlalchemy import select

from devstack import daemons, services
from devstack.procs import WorkerProcess
from devstack.simulator.limits import max_in_window
from jobs import api, dryrun, environment, migrate, reports
from jobs.db import session_scope
from jobs.environment import child_env, worker_argv
from jobs.models import Attempt, Job
from jobs.progress import ProgressPrinter
from jobs.settings import Settings

TOPICS = (
    "the water cycle",
    "how a bicycle gear works",
    "why the sky is blue",
    "the history of the printing press",
    "how vaccines train the immune system",
    "what a hash table is",
    "how tides form",
    "the rules of chess castling",
    "how sourdough starter works",
    "what causes the seasons",
    "how a transistor switches",
    "why cats purr",
)
STYLES = (
    "Explain {topic} in two sentences.",
    "Give three bullet points about {topic}.",
    "Write a haiku about {topic}.",
    "Explain {topic} to a ten-year-old.",
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Fetches the current weather for a given city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def demo_requests(count: int, model: str) -> list[dict[str, Any]]:
    """Embedded demo prompts; every tenth one exercises tool calling."""
    requests: list[dict[str, Any]] = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        style = STYLES[(i // len(TOPICS)) % len(STYLES)]
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": style.format(topic=topic)},
            ],
            "max_tokens": 200,
            "temperature": 0.5,
        }
        if i % 10 == 9:
            body["messages"][-1]["content"] = "What's the weather like in Portland right now?"
            body["tools"] = [WEATHER_TOOL]
            body["tool_choice"] = "auto"
        requests.append(
            {
                "custom_id": f"demo-{i + 1}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
    return requests


@dataclass(frozen=True)
class Pace:
    """How fast a batch's calls were started, by the database's clock."""

    calls: int
    span_s: float
    max_in_window: int


def pace(database_url: str, *, batch_id: int, window_s: float = 60.0) -> Pace:
    """Calls of a batch, the span from first to last call start, and the most
    calls started in any ``window_s`` sliding window (never above the limit)."""
    with session_scope(database_url) as session:
        starts = [
            ts.timestamp()
            for ts in session.execute(
                select(Attempt.started_at)
                .join(Job, Job.id == Attempt.job_id)
                .where(Job.batch_id == batch_id)
                .order_by(Attempt.started_at)
            ).scalars()
        ]
    if not starts:
        return Pace(0, 0.0, 0)
    most, _ = max_in_window([(t, 0) for t in starts], window_s)
    return Pace(len(starts), starts[-1] - starts[0], most)


def run_demo(*, requests: int, out: TextIO) -> int:
    """The demo batch through a worker of its own; stops whatever it started."""
    env_settings = Settings.from_env()
    simulated = env_settings.simulated
    var_dir = daemons.var_dir_of(env_settings)
    before = set(services.running(var_dir))
    settings = environment.resolve(env_settings)
    started = set(services.running(var_dir)) - before
    assert settings.database_url is not None
    worker: WorkerProcess | None = None
    try:
        if simulated:
            out.write(
                "INFERENCE_URL is unset: calls go to the bundled simulator at "
                f"{settings.inference_url}; results are SIMULATED, not the real model's.\n"
            )
        out.write("migrating the database...\n")
        migrate.upgrade(settings.database_url)
        log_path = var_dir / "demo-worker.log"
        out.write(f"starting a worker (log: {log_path})...\n")
        worker = WorkerProcess(worker_argv(settings), child_env(settings), log_path, append=True)
        worker.wait_ready()
        out.write(f"submitting {requests} requests (limit {settings.rpm} requests/min)...\n")
        out.flush()
        t0 = time.monotonic()
        batch = api.submit_batch(
            demo_requests(requests, settings.model_id), name="demo", settings=settings
        )
        printer = ProgressPrinter(
            sys.stderr, every_s=5.0, pace=lambda: dryrun.pace(settings, batch.id).describe()
        )
        final = batch.wait(on_progress=printer, on_notice=printer.notice)
        elapsed = time.monotonic() - t0
        ledger = reports.usage(settings.database_url, batch_id=batch.id)
        paced = pace(settings.database_url, batch_id=batch.id)
        out.write(
            f"\nbatch {batch.id}: {final.succeeded} succeeded, {final.failed} failed, "
            f"{final.cancelled} cancelled of {final.total}\n"
            f"tokens: {sum(r.prompt_tokens for r in ledger)} prompt + "
            f"{sum(r.completion_tokens for r in ledger)} completion = "
            f"{sum(r.total_tokens for r in ledger)} total, in {paced.calls} calls\n"
            f"elapsed: {elapsed:.1f} s from submission to the last result\n"
            f"achieved: {paced.max_in_window} calls started in the busiest 60 s window = "
            f"{100.0 * paced.max_in_window / settings.rpm:.1f}% of the {settings.rpm} "
            f"requests/min limit ({paced.calls} calls over {paced.span_s:.1f} s; calls take "
            f"turns, one every {(60.0 + settings.window_margin_s) / settings.rpm:.2f} s)\n"
        )
        if simulated:
            out.write("(simulated results: the simulator answered, not Kimi K2.5)\n")
        return 0 if final.failed == 0 and final.succeeded == final.total else 1
    finally:
        if worker is not None:
            worker.stop(30.0)
        if started:
            services.stop(var_dir, tuple(started))
            out.write(f"stopped the embedded services this demo started: {sorted(started)}\n")
        out.flush()
