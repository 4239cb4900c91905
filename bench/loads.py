"""Request bodies of known size, batch files, and the plain httpx clients scenarios compare with.

Every body is unique (its index is in the prompt), so the simulator's ``duplicate_bodies``
counter only moves when the system pays twice for the same job. Prompt sizes are exact in
the simulator's accounting: one user message of ``n`` tokens costs ``4 + ceil(chars / cpt)``.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from worker.responses import parse_duration

MODEL = "kimi-k2-5"
#: Tokens the simulator adds per message on top of its text.
MESSAGE_TOKENS = 4
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu "
)


#: Text for a simulator set to count fewer than 2 characters a token, as Chinese does: each
#: character is 3 bytes of UTF-8, so an estimate made from bytes errs the other way.
_CJK_WORDS = "数据分析报告总结模型推理请求批量处理结果输出令牌限制窗口时间成本预算"
#: Below this many characters a token the prompts are CJK text.
CJK_BELOW = 2.0


def prompt_text(tag: str, index: int, tokens: int, chars_per_token: float = 4.0) -> str:
    """A unique user prompt that the simulator counts as exactly ``tokens`` prompt tokens."""
    chars = max(1, math.floor((tokens - MESSAGE_TOKENS) * chars_per_token))
    head = f"[{tag} #{index}] Summarise: "
    words = _CJK_WORDS if chars_per_token < CJK_BELOW else _WORDS
    repeats = chars // len(words) + 1
    return (head + words * repeats)[:chars]


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
    tag: str,
    count: int,
    prompt_tokens: int,
    max_tokens: int,
    start: int = 0,
    chars_per_token: float = 4.0,
) -> list[dict[str, Any]]:
    """``count`` unique bodies of the same size (in the simulator's count of tokens)."""
    return [
        chat_body(tag, i, prompt_tokens, max_tokens, chars_per_token)
        for i in range(start, start + count)
    ]


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


@dataclass(frozen=True)
class Attempt:
    """One request of the other client as sent: when, which try, and the answer."""

    #: ``time.monotonic()`` when it was sent (the simulator's call log uses the same clock).
    at: float
    index: int
    #: 1 for the first try of a request, 2 for its first retry, ...
    try_number: int
    #: HTTP status, or None for a transport error.
    status: int | None


def retry_wait(reply: httpx.Response, try_number: int, rng: random.Random) -> float:
    """How long a well-behaved client waits before retrying a 429.

    The reset it was given: ``Retry-After`` if sent, else the ``x-ratelimit-reset-*`` of
    each exhausted dimension (the longest). Without any, the ``openai`` SDK's own backoff:
    0.5 s doubling per try up to 8 s, less up to a quarter of jitter.
    """
    given = reply.headers.get("retry-after")
    if given is not None and (seconds := parse_duration(given)) is not None:
        return seconds
    resets: list[float] = []
    for dim in ("requests", "tokens"):
        if reply.headers.get(f"x-ratelimit-remaining-{dim}") == "0":
            seconds = parse_duration(reply.headers.get(f"x-ratelimit-reset-{dim}", ""))
            if seconds is not None:
                resets.append(seconds)
    if resets:
        return max(resets)
    backoff: float = min(0.5 * 2.0 ** (try_number - 1), 8.0)
    return backoff * (1.0 - 0.25 * rng.random())


class PacedClient:
    """A second application on the same key: ``rpm`` requests a minute, evenly spaced.

    Open loop: each request is sent on schedule from a thread pool, so slow answers do not
    slow the pace. With ``tries`` > 1 it retries a 429 after the reset it was given
    (:func:`retry_wait`), as real clients do, up to ``tries`` attempts in all; with 1 it
    neither reads nor respects the rate-limit headers. Every attempt is recorded in
    :attr:`attempts`, and carries ``marker`` as its ``user`` field so that the simulator's
    call log tells its calls from ours.
    """

    def __init__(
        self,
        base_url: str,
        key: str,
        rpm: float,
        prompt_tokens: int,
        max_latency_s: float,
        *,
        tries: int = 1,
        marker: str = "other-client",
    ) -> None:
        self.interval = 60.0 / rpm
        self.prompt_tokens = prompt_tokens
        self.tries = tries
        self.marker = marker
        # A thread per request in flight, waits between tries included (a reset is at most
        # a window).
        busy_s = max_latency_s + (tries - 1) * (max_latency_s + 60.0)
        workers = max(4, math.ceil(busy_s / self.interval) + 4)
        self._client = _client(base_url, key, workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="paced")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self.attempts: list[Attempt] = []
        self._thread = threading.Thread(target=self._run, name="paced-client", daemon=True)

    @property
    def sent(self) -> int:
        return len(self.attempts)

    @property
    def errors(self) -> int:
        return sum(1 for a in self.attempts if a.status is None)

    @property
    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.attempts if a.status is not None)

    def start(self) -> PacedClient:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.monotonic()
        index = 0
        while not self._stop.is_set():
            self._pool.submit(self._request, index)
            index += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _request(self, index: int) -> None:
        body = chat_body("other", index, self.prompt_tokens, 100) | {"user": self.marker}
        for try_number in range(1, self.tries + 1):
            at = time.monotonic()
            try:
                reply = self._client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                self._record(Attempt(at, index, try_number, None))
                return
            self._record(Attempt(at, index, try_number, reply.status_code))
            if reply.status_code != 429 or try_number == self.tries:
                return
            with self._lock:
                wait = retry_wait(reply, try_number, self._rng)
            if self._stop.wait(wait):
                return

    def _record(self, attempt: Attempt) -> None:
        with self._lock:
            self.attempts.append(attempt)

    def stop(self) -> None:
        """Stop sending (retries waiting are dropped) and wait for the calls in flight."""
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)
        self._client.close()
