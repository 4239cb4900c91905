"""Request bodies of known size, batch files, and the plain httpx clients scenarios compare with.

Every body is unique (its index is in the prompt), so the simulator's ``duplicate_bodies``
counter only moves when the system pays twice for the same job. Prompt sizes are exact in
the simulator's accounting: one user message of ``n`` tokens costs ``4 + ceil(chars / cpt)``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL = "kimi-k2-5"
#: Tokens the simulator adds per message on top of its text.
MESSAGE_TOKENS = 4
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu "
)


def prompt_text(tag: str, index: int, tokens: int, chars_per_token: float = 4.0) -> str:
    """A unique user prompt that the simulator counts as exactly ``tokens`` prompt tokens."""
    chars = max(1, math.floor((tokens - MESSAGE_TOKENS) * chars_per_token))
    head = f"[{tag} #{index}] Summarise: "
    repeats = chars // len(_WORDS) + 1
    return (head + _WORDS * repeats)[:chars]


def chat_body(
    tag: str, index: int, prompt_tokens: int, max_tokens: int, chars_per_token: float = 4.0
) -> dict[str, Any]:
    """A chat-completion body with one user message."""
    return {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": prompt_text(tag, index, prompt_tokens, chars_per_token)}
        ],
        "max_tokens": max_tokens,
    }


def bodies(
    tag: str, count: int, prompt_tokens: int, max_tokens: int, start: int = 0
) -> list[dict[str, Any]]:
    """``count`` unique bodies of the same size."""
    return [chat_body(tag, i, prompt_tokens, max_tokens) for i in range(start, start + count)]


def batch_lines(tag: str, count: int, prompt_tokens: int, max_tokens: int) -> Iterator[str]:
    """OpenAI Batch input lines (JSON text, no newline)."""
    for i in range(count):
        yield json.dumps(
            {
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat_body(tag, i, prompt_tokens, max_tokens),
            },
            separators=(",", ":"),
        )


def write_batch_file(path: Path, tag: str, count: int, prompt_tokens: int, max_tokens: int) -> int:
    """Write an OpenAI Batch JSONL file; returns its size in bytes."""
    with path.open("w", encoding="utf-8") as fh:
        for line in batch_lines(tag, count, prompt_tokens, max_tokens):
            fh.write(line + "\n")
    return path.stat().st_size


def _client(base_url: str, key: str, connections: int) -> httpx.Client:
    return httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(120.0, connect=10.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


@dataclass(frozen=True)
class LoopResult:
    """What a plain sequential client achieved."""

    calls: int
    ok: int
    seconds: float
    cpu_seconds: float


def plain_loop(base_url: str, key: str, count: int, tag: str, prompt_tokens: int) -> LoopResult:
    """Call the endpoint ``count`` times back to back from one thread, no throttle, no DB."""
    ok = 0
    with _client(base_url, key, 1) as client:
        cpu0, t0 = time.thread_time(), time.perf_counter()
        for i in range(count):
            reply = client.post("/v1/chat/completions", json=chat_body(tag, i, prompt_tokens, 16))
            ok += reply.status_code == 200
        seconds, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    return LoopResult(count, ok, seconds, cpu)


def plain_pool(
    base_url: str, key: str, count: int, tag: str, prompt_tokens: int, threads: int
) -> LoopResult:
    """The same calls from ``threads`` threads sharing one pooled client (CPU = this process)."""
    ok = 0
    lock = threading.Lock()
    with _client(base_url, key, threads) as client:

        def one(i: int) -> None:
            nonlocal ok
            reply = client.post("/v1/chat/completions", json=chat_body(tag, i, prompt_tokens, 16))
            with lock:
                ok += reply.status_code == 200

        cpu0, t0 = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, range(count)))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return LoopResult(count, ok, seconds, cpu)


class PacedClient:
    """A second application on the same key: ``rpm`` calls a minute, evenly spaced.

    Open loop: each call is sent on schedule from a small thread pool, so slow answers do
    not slow the pace. It neither reads nor respects rate-limit headers.
    """

    def __init__(
        self, base_url: str, key: str, rpm: float, prompt_tokens: int, max_latency_s: float
    ) -> None:
        self.interval = 60.0 / rpm
        self.prompt_tokens = prompt_tokens
        workers = max(4, math.ceil(max_latency_s / self.interval) + 4)
        self._client = _client(base_url, key, workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="paced")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="paced-client", daemon=True)

    def start(self) -> PacedClient:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.monotonic()
        index = 0
        while not self._stop.is_set():
            self._pool.submit(self._call, index)
            index += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _call(self, index: int) -> None:
        body = chat_body("other", index, self.prompt_tokens, 100)
        try:
            reply = self._client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError:
            with self._lock:
                self.sent += 1
                self.errors += 1
            return
        with self._lock:
            self.sent += 1
            self.statuses[reply.status_code] += 1

    def stop(self) -> None:
        """Stop sending and wait for the calls in flight."""
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)
        self._client.close()
