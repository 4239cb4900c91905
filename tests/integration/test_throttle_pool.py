"""Several buckets asked as one (a pool of keys serving one model): the first with room
takes the call, a paused bucket leaves it to the others, and a call too large for one
bucket goes to another that can take it."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from worker.throttle import (
    NoBucket,
    RequestTooLarge,
    Throttle,
    ThrottleTimeout,
    Turnstiles,
    acquire_first,
    no_history,
)

pytestmark = pytest.mark.integration


def bucket(client: redis.Redis, name: str, *, rpm: int = 2, tpm: int = 1_000_000) -> Throttle:
    # A window of 2 s: bulk calls of one bucket take turns 1 s apart.
    return Throttle(client, f"pool-test:{name}", rpm=rpm, tpm=tpm, window_s=2.0, seed=no_history)


def test_the_first_bucket_with_room_takes_the_call(redis_conn: redis.Redis) -> None:
    a, b = bucket(redis_conn, "a"), bucket(redis_conn, "b")
    turnstiles = Turnstiles()

    def take(max_wait: float) -> Throttle:
        return acquire_first(lambda: [a, b], lambda: 10, turnstiles=turnstiles, max_wait=max_wait)[
            0
        ]

    # A's turn is taken, so the next call is B's at once; then both wait for a turn.
    assert [take(0.0), take(0.0)] == [a, b]
    with pytest.raises(ThrottleTimeout, match="pool-test:a, pool-test:b"):
        take(0.0)
    # A 429 pauses A alone: the next turns are B's.
    a.pause(5.0)
    started = time.monotonic()
    assert take(3.0) is b
    assert time.monotonic() - started < 2.0
    assert take(3.0) is b
    assert a.stats().admitted == 1 and b.stats().admitted == 3


def test_a_call_too_large_for_one_bucket_goes_to_another(redis_conn: redis.Redis) -> None:
    small, large = bucket(redis_conn, "small", tpm=100), bucket(redis_conn, "large", tpm=1_000)
    turnstiles = Turnstiles()
    throttle, admission = acquire_first(
        lambda: [small, large], lambda: 500, turnstiles=turnstiles, max_wait=0.0
    )
    assert throttle is large and admission.tokens == 500
    with pytest.raises(RequestTooLarge, match="pool-test:large allows only 1000 tokens"):
        acquire_first(lambda: [small, large], lambda: 5_000, turnstiles=turnstiles, max_wait=0.0)


def test_a_bucket_set_aside_while_the_call_waits_is_asked_no_more(
    redis_conn: redis.Redis,
) -> None:
    a, b = bucket(redis_conn, "a2"), bucket(redis_conn, "b2")
    open_ = [a, b]
    a.pause(2.0)
    b.pause(2.0)  # neither admits for 2 s: the call waits, asking both
    taken: list[Throttle] = []
    waiting = threading.Thread(
        target=lambda: taken.append(
            acquire_first(lambda: list(open_), lambda: 10, turnstiles=Turnstiles(), max_wait=5.0)[0]
        )
    )
    waiting.start()
    time.sleep(0.6)
    open_.remove(b)  # the caller sets B aside while the call waits
    trips = b.stats().redis_round_trips
    waiting.join(5.0)
    assert taken == [a]
    # Asked every POLL_S while it was a candidate, and at most once more after.
    assert trips >= 2 and b.stats().redis_round_trips - trips <= 1
    open_.clear()
    with pytest.raises(NoBucket, match="every bucket the call may use is set aside"):
        acquire_first(lambda: list(open_), lambda: 10, turnstiles=Turnstiles(), max_wait=1.0)
