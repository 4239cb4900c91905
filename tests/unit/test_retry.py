"""Unit tests for worker.retry.RetryPolicy."""

from __future__ import annotations

import random

import pytest

from jobs.settings import Settings
from worker.errors import (
    AuthFailed,
    ConnectionFailed,
    MalformedResponse,
    ModelError,
    RateLimited,
    RequestRejected,
    ServerError,
    Timeout,
)
from worker.retry import RetryPolicy

BACKOFF_ERRORS: list[ModelError] = [
    ServerError("HTTP 503", status=503),
    Timeout("read timeout"),
    ConnectionFailed("connection failed"),
    MalformedResponse("not JSON", status=200),
]


@pytest.mark.parametrize("error", [RequestRejected("HTTP 400", status=400), AuthFailed("401")])
def test_non_retryable_gives_up_at_once(error: ModelError) -> None:
    assert RetryPolicy().delay(error, 1) is None


@pytest.mark.parametrize("error", [*BACKOFF_ERRORS, RateLimited("429", retry_after=1.0)])
def test_gives_up_at_max_attempts(error: ModelError) -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.delay(error, 1) is not None
    assert policy.delay(error, 2) is not None
    assert policy.delay(error, 3) is None
    assert policy.delay(error, 4) is None


def test_single_attempt_never_retries() -> None:
    assert RetryPolicy(max_attempts=1).delay(ServerError("HTTP 500"), 1) is None


@pytest.mark.parametrize("error", BACKOFF_ERRORS)
def test_backoff_is_bounded(error: ModelError) -> None:
    policy = RetryPolicy(max_attempts=20, base=1.0, cap=60.0)
    rng = random.Random(1234)
    for attempt in range(1, 20):
        bound = min(60.0, 2.0 ** (attempt - 1))
        for _ in range(200):
            delay = policy.delay(error, attempt, rng=rng)
            assert delay is not None
            assert 0.1 <= delay <= bound


def test_backoff_bound_grows_exponentially_up_to_cap() -> None:
    policy = RetryPolicy(max_attempts=20, base=0.5, cap=10.0)
    bounds = [policy.backoff_bound(a) for a in range(1, 9)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_sampled_delays_grow_with_attempts() -> None:
    """The largest of many draws tracks the bound, so later attempts wait longer."""
    policy = RetryPolicy(max_attempts=10, base=1.0, cap=60.0)
    rng = random.Random(42)
    largest = []
    for attempt in (1, 3, 5, 7):
        draws = [policy.delay(ServerError("x"), attempt, rng=rng) for _ in range(500)]
        values = [d for d in draws if d is not None]
        assert len(values) == 500
        largest.append(max(values))
    # Bounds are 1, 4, 16, 64->60; 500 uniform draws land within a few % of the bound.
    assert largest[0] <= 1.0 < largest[1] <= 4.0 < largest[2] <= 16.0 < largest[3] <= 60.0


def test_equal_jitter_waits_at_least_half_the_bound() -> None:
    """The guaranteed half: the default 8 calls span at least 61.5 s, past a 30 s outage."""
    policy = RetryPolicy()
    rng = random.Random(3)
    for attempt in range(1, 8):
        bound = policy.backoff_bound(attempt)
        for _ in range(200):
            delay = policy.delay(ServerError("x"), attempt, rng=rng)
            assert delay is not None and bound / 2 <= delay <= bound
    assert sum(policy.backoff_bound(a) / 2 for a in range(1, 8)) == 61.5


def test_jitter_spreads_delays() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    draws = {policy.delay(Timeout("t"), 4, rng=rng) for _ in range(50)}
    assert len(draws) > 40


def test_same_seed_same_delay() -> None:
    policy = RetryPolicy()
    first = policy.delay(ServerError("x"), 3, rng=random.Random(99))
    second = policy.delay(ServerError("x"), 3, rng=random.Random(99))
    assert first == second


def test_huge_attempt_numbers_stay_at_cap() -> None:
    policy = RetryPolicy(max_attempts=100_000, cap=30.0)
    delay = policy.delay(ServerError("x"), 50_000, rng=random.Random(0))
    assert delay is not None
    assert 0.1 <= delay <= 30.0


def test_429_honours_retry_after() -> None:
    policy = RetryPolicy(cap=5.0)
    rng = random.Random(5)
    error = RateLimited("429", retry_after=12.0)
    delays = [policy.delay(error, 1, rng=rng) for _ in range(200)]
    # Not capped by ``cap``: the provider said 12 s, so never less, at most 10% more.
    assert all(d is not None and 12.0 <= d <= 13.2 for d in delays)
    assert len(set(delays)) > 150


def test_429_without_hint_uses_fallback() -> None:
    policy = RetryPolicy(rate_limit_fallback=30.0)
    rng = random.Random(6)
    for _ in range(100):
        delay = policy.delay(RateLimited("429", retry_after=None), 2, rng=rng)
        assert delay is not None
        assert 30.0 <= delay <= 33.0


def test_429_with_zero_retry_after_still_waits_the_floor() -> None:
    delay = RetryPolicy(base=2.0).delay(RateLimited("429", retry_after=0.0), 1)
    assert delay == pytest.approx(0.2)


def test_attempt_is_one_based() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().delay(ServerError("x"), 0)
    with pytest.raises(ValueError):
        RetryPolicy().backoff_bound(0)


def test_fits() -> None:
    policy = RetryPolicy()
    assert policy.fits(10.0, 60.0)
    assert policy.fits(60.0, 60.0)
    assert not policy.fits(61.0, 60.0)
    assert policy.fits(10.0, 400.0, reserve_s=300.0)
    assert not policy.fits(10.0, 300.0, reserve_s=300.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base": 0.0},
        {"cap": -1.0},
        {"rate_limit_fallback": -1.0},
    ],
)
def test_invalid_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_from_settings() -> None:
    settings = Settings(max_attempts=7, backoff_base=0.5, backoff_max=20.0)
    policy = RetryPolicy.from_settings(settings)
    assert (policy.max_attempts, policy.base, policy.cap) == (7, 0.5, 20.0)
    assert policy.delay(ServerError("x"), 6) is not None
    assert policy.delay(ServerError("x"), 7) is None
