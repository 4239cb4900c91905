"""``make demo`` (``python -m devstack demo``): a whole batch, end to end, on whatever the
settings point at.

With nothing set this starts the embedded PostgreSQL and Redis, the bundled
simulator and one worker process, runs a demo batch through them, prints a
summary and stops everything it started. ``--pool N`` runs N simulators as N
attachments of a pool (:mod:`jobs.attachments`), each with its own key and limits.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from sqlalchemy import select

from devstack import daemons, services
from devstack.procs import WorkerProcess
from devstack.simulator import Simulator, SimulatorConfig
from devstack.simulator.limits import max_in_window
from jobs import api, dryrun, environment, migrate, reports
from jobs.attachments import pool_variables
from jobs.db import session_scope
from jobs.environment import child_env, worker_argv
from jobs.models import Attempt, Job
from jobs.progress import ProgressPrinter
from jobs.settings import Attachment, ConfigError, Settings

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


def _simulated_pool(
    settings: Settings, size: int, stack: contextlib.ExitStack
) -> tuple[Attachment, ...]:
    """``size - 1`` more simulators in this process, each an attachment of the pool with
    the first one's limits and a key of its own; stopped with ``stack``."""
    low, high = (float(x) for x in services.SIMULATOR_LATENCY.split(":"))
    attachments = []
    for n in range(2, size + 1):
        key = "sim-" + secrets.token_hex(12)
        config = SimulatorConfig(
            key=key, rpm=settings.rpm, tpm=settings.tpm, latency_min=low, latency_max=high
        )
        sim = stack.enter_context(Simulator(config))
        attachments.append(
            Attachment(
                alias=f"INFERENCE_{n}",
                url=sim.url,
                key=key,
                model_id=settings.model_id,
                rpm=settings.rpm,
                tpm=settings.tpm,
                context_tokens=settings.context_tokens,
                headroom=settings.headroom,
                price=settings.price,
            )
        )
    return tuple(attachments)


def _summary(
    out: TextIO, settings: Settings, batch_id: int, final: api.BatchProgress, elapsed: float
) -> None:
    """What the batch did: its jobs, tokens, time and pace against the limit."""
    assert settings.database_url is not None
    ledger = reports.usage(settings.database_url, batch_id=batch_id)
    paced = pace(settings.database_url, batch_id=batch_id)
    limit = settings.pool_rpm
    out.write(
        f"\nbatch {batch_id}: {final.succeeded} succeeded, {final.failed} failed, "
        f"{final.cancelled} cancelled of {final.total}\n"
        f"tokens: {sum(r.prompt_tokens for r in ledger)} prompt + "
        f"{sum(r.completion_tokens for r in ledger)} completion = "
        f"{sum(r.total_tokens for r in ledger)} total, in {paced.calls} calls\n"
        f"elapsed: {elapsed:.1f} s from submission to the last result\n"
        f"achieved: {paced.max_in_window} calls started in the busiest 60 s window = "
        f"{100.0 * paced.max_in_window / limit:.1f}% of the {limit} "
        f"requests/min limit ({paced.calls} calls over {paced.span_s:.1f} s; calls take "
        f"turns, one every {(60.0 + settings.window_margin_s) / settings.rpm:.2f} s"
        f"{' on each key' if settings.pool else ''})\n"
    )
    if settings.pool:
        by = Counter[str]()
        for row in ledger:
            by[row.attachment or "-"] += row.calls
        out.write("calls by attachment: " + ", ".join(f"{a} {n}" for a, n in by.items()) + "\n")


def run_demo(*, requests: int, out: TextIO, pool: int = 1) -> int:
    """The demo batch through a worker of its own; stops whatever it started."""
    env_settings = Settings.from_env()
    simulated = env_settings.simulated
    if pool > 1 and (not simulated or env_settings.pool):
        raise ConfigError(
            "--pool runs simulators as the attachments: with INFERENCE_URL or INFERENCE_POOL "
            "set, the pool is yours already (unset them, or drop --pool)"
        )
    var_dir = daemons.var_dir_of(env_settings)
    before = set(services.running(var_dir))
    settings = environment.resolve(env_settings)
    started = set(services.running(var_dir)) - before
    database_url = settings.database_url
    assert database_url is not None
    worker: WorkerProcess | None = None
    extra = contextlib.ExitStack()
    try:
        if pool > 1:
            settings = settings.replace(pool=_simulated_pool(settings, pool, extra))
        if simulated:
            out.write(
                "INFERENCE_URL is unset: calls go to the bundled simulator at "
                f"{settings.inference_url}"
                + "".join(f" and {a.alias} at {a.url}" for a in settings.pool)
                + "; results are SIMULATED, not the real model's.\n"
            )
        out.write("migrating the database...\n")
        migrate.upgrade(database_url)
        log_path = var_dir / "demo-worker.log"
        out.write(f"starting a worker (log: {log_path})...\n")
        env = child_env(settings) | pool_variables(settings.attachments)
        worker = WorkerProcess(worker_argv(settings), env, log_path, append=True)
        worker.wait_ready()
        keys = f" over {len(settings.attachments)} keys" if settings.pool else ""
        out.write(
            f"submitting {requests} requests (limit {settings.pool_rpm} requests/min{keys})...\n"
        )
        out.flush()
        t0 = time.monotonic()
        batch = api.submit_batch(
            demo_requests(requests, settings.model_id), name="demo", settings=settings
        )
        printer = ProgressPrinter(
            sys.stderr, every_s=5.0, pace=lambda: dryrun.pace(settings, batch.id).describe()
        )
        final = batch.wait(on_progress=printer, on_notice=printer.notice)
        _summary(out, settings, batch.id, final, time.monotonic() - t0)
        if simulated:
            out.write("(simulated results: the simulator answered, not Kimi K2.5)\n")
        return 0 if final.failed == 0 and final.succeeded == final.total else 1
    finally:
        if worker is not None:
            worker.stop(30.0)
        extra.close()
        if started:
            services.stop(var_dir, tuple(started))
            out.write(f"stopped the embedded services this demo started: {sorted(started)}\n")
        out.flush()
