"""Helpers shared by the throttle's integration tests: counting client, log readers, checks."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import redis

from jobs.constants import throttle_costs_key, throttle_log_key
from worker.throttle import History, Throttle, no_history

BUCKET = "test-model:0123456789ab"


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends (round trips, pipelines aside)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0
        self._count_lock = threading.Lock()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with self._count_lock:
            self.sent += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def counting_client(url: str) -> CountingRedis:
    """A counting client for ``url`` (``from_url`` keeps the subclass)."""
    return cast("CountingRedis", CountingRedis.from_url(url))


def make(
    client: redis.Redis, *, seed: Callable[[], History] = no_history, **kwargs: Any
) -> Throttle:
    """A throttle on the test bucket; by default one that knows its window starts empty."""
    return Throttle(client, BUCKET, seed=seed, **kwargs)


def redis_now_ms(client: redis.Redis) -> int:
    """Now on the clock the throttle's scripts read (Redis ``TIME``), in ms."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def log_size(client: redis.Redis, bucket: str = BUCKET) -> int:
    """Calls in the bucket's log, whether or not they already left the window."""
    return int(client.zcard(throttle_log_key(bucket)))


def entries(client: redis.Redis, bucket: str = BUCKET) -> list[tuple[int, int, str]]:
    """The log as ``(score, tokens, id)`` in Redis order (score, then id); the tokens
    come from the costs hash (0 for an id without a cost)."""
    raw = cast(
        "list[tuple[bytes, float]]",
        client.zrange(throttle_log_key(bucket), 0, -1, withscores=True),
    )
    costs = cast("dict[bytes, bytes]", client.hgetall(throttle_costs_key(bucket)))
    return [(int(score), int(costs.get(member, b"0")), member.decode()) for member, score in raw]


def members(client: redis.Redis, bucket: str = BUCKET) -> dict[str, int]:
    """The log as ``id -> score``."""
    return {member: score for score, _, member in entries(client, bucket)}


def costs(client: redis.Redis, bucket: str = BUCKET) -> dict[str, int]:
    """The costs hash as ``id -> tokens``."""
    raw = cast("dict[bytes, bytes]", client.hgetall(throttle_costs_key(bucket)))
    return {k.decode(): int(v) for k, v in raw.items()}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def worst_window(records: Iterable[Sequence[int]], window_ms: int) -> tuple[int, int]:
    """Most requests and most tokens in any span of ``window_ms`` ms of the records.

    ``records`` are ``(at_ms, tokens, ...)``. The throttle's window ending at ``t`` is
    ``(t - W, t]``; with whole ms that is the half-open ``[s, s + W)`` counted here.
    """
    ordered = sorted((r[0], r[1]) for r in records)
    starts = [start for start, _ in ordered]
    prefix = [0]
    for _, tokens in ordered:
        prefix.append(prefix[-1] + tokens)
    most_requests = most_tokens = 0
    for i, start in enumerate(starts):
        j = bisect.bisect_left(starts, start + window_ms)
        most_requests = max(most_requests, j - i)
        most_tokens = max(most_tokens, prefix[j] - prefix[i])
    return most_requests, most_tokens


#: How late a woken thread may ask again on a loaded two-core machine (ms). Only the
#: upper bounds of admission times use it; lower bounds are exact.
LATE_MS = 150


def gaps(ats: Iterable[int]) -> list[int]:
    """The gaps between consecutive admission times."""
    ordered = sorted(ats)
    return [b - a for a, b in itertools.pairwise(ordered)]
