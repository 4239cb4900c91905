"""``make demo``: a whole batch, end to end, on whatever the settings point at.

With nothing set this starts the embedded PostgreSQL and Redis, the bundled
simulator and one worker process, runs a demo batch through them, prints a
summary and stops everything it started.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any, TextIO

from jobs import api, migrate, reports, services
from jobs.cli import ProgressPrinter, _exec_env, worker_argv
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


def _stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_demo(*, requests: int, out: TextIO) -> int:
    env_settings = Settings.from_env()
    simulated = env_settings.simulated
    before = set(services.running(env_settings.var_dir))
    settings = services.resolve(env_settings)
    started = set(services.running(settings.var_dir)) - before
    assert settings.database_url is not None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if simulated:
            out.write(
                "INFERENCE_URL is unset: calls go to the bundled simulator at "
                f"{settings.inference_url}; results are SIMULATED, not the real model's.\n"
            )
        out.write("migrating the database...\n")
        migrate.upgrade(settings.database_url)
        log_path = settings.var_dir / "demo-worker.log"
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        out.write(f"starting a worker (log: {log_path})...\n")
        with open(log_path, "ab") as log:
            worker = subprocess.Popen(
                worker_argv(settings), env=_exec_env(settings), stdout=log, stderr=log
            )
        out.write(f"submitting {requests} requests (limit {settings.rpm} requests/min)...\n")
        out.flush()
        t0 = time.monotonic()
        batch = api.submit_batch(
            demo_requests(requests, settings.model_id), name="demo", settings=settings
        )
        final = batch.wait(on_progress=ProgressPrinter(sys.stderr, every_s=5.0))
        elapsed = time.monotonic() - t0
        ledger = reports.usage(settings.database_url, batch_id=batch.id)
        pace = reports.pace(settings.database_url, batch_id=batch.id)
        out.write(
            f"\nbatch {batch.id}: {final.succeeded} succeeded, {final.failed} failed, "
            f"{final.cancelled} cancelled of {final.total}\n"
            f"tokens: {sum(r.prompt_tokens for r in ledger)} prompt + "
            f"{sum(r.completion_tokens for r in ledger)} completion = "
            f"{sum(r.total_tokens for r in ledger)} total, in {pace.calls} calls\n"
            f"elapsed: {elapsed:.1f} s from submission to the last result\n"
            f"achieved: {pace.max_in_window} calls started in the busiest 60 s window = "
            f"{100.0 * pace.max_in_window / settings.rpm:.1f}% of the {settings.rpm} requests/min "
            f"limit ({pace.calls} calls over {pace.span_s:.1f} s; a sliding window admits a "
            "full minute's quota at once, then the next as the window rolls)\n"
        )
        if simulated:
            out.write("(simulated results: the simulator answered, not Kimi K2.5)\n")
        return 0 if final.failed == 0 and final.succeeded == final.total else 1
    finally:
        if worker is not None:
            _stop_worker(worker)
        if started:
            services.stop(settings.var_dir, tuple(started))
            out.write(f"stopped the embedded services this demo started: {sorted(started)}\n")
        out.flush()
