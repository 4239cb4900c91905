"""The baseline the global throttle is compared with: Celery's own per-task ``rate_limit``.

A tiny, separate Celery app of the kind a team writes first: one task that POSTs a body
with httpx, ``rate_limit="150/m"`` on the task, and Celery's exponential retry on a 429.
Celery enforces ``rate_limit`` per worker process, not across workers, and there is no
shared bucket, no token accounting and no ledger. Run it as
``celery -A bench.baseline_app worker --pool threads``; it reads REDIS_URL, INFERENCE_URL,
INFERENCE_KEY and BASELINE_RATE_LIMIT (default ``150/m``) from the environment.

Each call's send time and status are appended to the Redis list :data:`SENDS_KEY`, so the
benchmark can show how many calls left the workers in the busiest minute.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import httpx
import redis
from celery import Celery, Task

QUEUE = "bench.baseline"
TASK_NAME = "bench.baseline.call"
#: Redis list of ``"<epoch seconds> <status>"`` per call (in the benchmark's own database).
SENDS_KEY = "bench:baseline:sends"
RATE_LIMIT = os.environ.get("BASELINE_RATE_LIMIT", "150/m")

app = Celery("bench_baseline")
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)

_local = threading.local()


class RateLimitedError(Exception):
    """The provider answered 429."""


def _http() -> httpx.Client:
    client: httpx.Client | None = getattr(_local, "client", None)
    if client is None:
        client = httpx.Client(
            base_url=os.environ["INFERENCE_URL"],
            headers={"Authorization": "Bearer " + os.environ["INFERENCE_KEY"]},
            timeout=httpx.Timeout(300.0, connect=10.0),
        )
        _local.client = client
    return client


def _redis() -> redis.Redis:
    conn: redis.Redis | None = getattr(_local, "redis", None)
    if conn is None:
        conn = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        _local.redis = conn
    return conn


@app.task(
    bind=True,
    name=TASK_NAME,
    rate_limit=RATE_LIMIT,
    autoretry_for=(RateLimitedError,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=50,
)
def call(self: Task[Any, Any], body: dict[str, Any]) -> int:
    """POST one chat completion; a 429 raises and Celery retries with backoff."""
    sent = time.time()
    reply = _http().post("/v1/chat/completions", json=body)
    _redis().rpush(SENDS_KEY, f"{sent:.3f} {reply.status_code}")
    if reply.status_code == 429:
        raise RateLimitedError(f"429 on attempt {self.request.retries + 1}")
    return reply.status_code
