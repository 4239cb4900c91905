"""Helpers shared by the throttle's integration tests: counting client, log readers, checks."""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, cast

import redis

from jobs.constants import throttle_log_key
from worker.throttle import History, Reservation, Throttle, no_history
from worker.throttle_reference import INTERACTIVE_KINDS, earliest_slot

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
    client: redis.Redis, *, seed: Callable[[], History] | None = no_history, **kwargs: Any
) -> Throttle:
    """A throttle on the test bucket; by default one that knows its window starts empty."""
    return Throttle(client, BUCKET, seed=seed, **kwargs)


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def log_size(client: redis.Redis) -> int:
    return int(client.zcard(throttle_log_key(BUCKET)))


def members(client: redis.Redis) -> dict[str, int]:
    """The log as ``member -> score``."""
    return {member: score for score, _, member in entries(client)}


def entries(client: redis.Redis, bucket: str = BUCKET) -> list[tuple[int, int, str]]:
    """The log as ``(score, tokens, member)``, in Redis order (score, then member)."""
    raw = cast(
        "list[tuple[bytes, float]]",
        client.zrange(throttle_log_key(bucket), 0, -1, withscores=True),
    )
    out = []
    for member, score in raw:
        text = member.decode()
        out.append((int(score), int(text.rsplit(":", 1)[1]), text))
    return out


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def wall_ms() -> int:
    """Now, in ms on the clock Redis ``TIME`` reads (the server under test is local)."""
    return time.time_ns() // 1_000_000


class Admitted(NamedTuple):
    """One admission: the slot the throttle granted, and when it let its caller go."""

    start_ms: int
    tokens: int
    released_ms: int


def admitted(reservation: Reservation) -> Admitted:
    """``reservation`` stamped with the moment its ``acquire`` returned: call it right then."""
    return Admitted(reservation.start_ms, reservation.tokens, wall_ms())


def released_early(records: Iterable[Admitted]) -> list[Admitted]:
    """The admissions whose caller went before its slot came.

    The window checks read the slots the throttle granted. A throttle that let callers
    go before their slots would grant a valid schedule all the same, and the provider
    counts a call when it arrives; so the release is checked too. Granting reads Redis
    ``TIME`` and a sleeper confirms its slot once more before it goes, so a caller is
    never released before its slot on the shared clock: no tolerance is needed.
    """
    return [r for r in records if r.released_ms < r.start_ms]


def worst_window(records: Iterable[Sequence[int]], window_ms: int) -> tuple[int, int]:
    """Most requests and most tokens in any half-open span [s, s + W) of the admissions.

    ``records`` are ``(start_ms, tokens, ...)``: :class:`Admitted` or plain pairs.
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


def overfull_future_windows(
    log: Sequence[tuple[int, int, str]], *, now_ms: int, window_ms: int, rpm: int, tpm: int
) -> list[int]:
    """Ends of windows (t - W, t] holding a slot after ``now_ms`` that exceed a limit.

    Window totals only grow at entry scores, so the windows ending at each future
    entry cover every window that holds one.
    """
    bad = []
    for end, _, _ in log:
        if end <= now_ms:
            continue
        inside = [tokens for score, tokens, _ in log if end - window_ms < score <= end]
        if len(inside) > rpm or sum(inside) > tpm:
            bad.append(end)
    return bad


def most_interactive(log: Sequence[tuple[int, int, str]], window_ms: int) -> int:
    """The most interactive entries any window ending at an entry holds."""
    return max(
        (
            sum(
                1
                for score, _, m in log
                if end - window_ms < score <= end and m.startswith(INTERACTIVE_KINDS)
            )
            for end, _, _ in log
        ),
        default=0,
    )


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def random_schedule(
    rng: random.Random, *, now_ms: int, window_ms: int, rpm: int, tpm: int, kinds: Sequence[str]
) -> list[tuple[int, int, str]]:
    """A valid log: entries placed one after another from one window ago, some booked ahead."""
    log: list[tuple[int, int, str]] = []
    t = now_ms - window_ms + 1
    for i in range(rng.randint(0, 25)):
        cost = rng.randint(0, tpm // 2)
        t += rng.randint(0, window_ms // 3)
        slot = earliest_slot(
            [(s, c) for s, c, _ in log],
            now_ms=t,
            pause_until_ms=0,
            window_ms=window_ms,
            rpm=rpm,
            tpm=tpm,
            cost=cost,
        )
        log.append((slot, cost, f"{rng.choice(kinds)}{i}:{cost}"))
    return log


def write_log(client: redis.Redis, log: Sequence[tuple[int, int, str]]) -> None:
    for score, _, member in log:
        client.zadd(throttle_log_key(BUCKET), {member: score})
