"""The prompt-token estimate learns the provider's tokenizer, per model and script."""

from __future__ import annotations

import pytest
import redis

from jobs.tokens import estimate_prompt_tokens
from worker.calibrate import MAX_MARGIN, MIN_MARGIN, TRUSTED_SAMPLES, Calibrator, dominant_script

pytestmark = pytest.mark.integration


def body(text: str) -> dict[str, object]:
    return {"model": "kimi-k2-5", "messages": [{"role": "user", "content": text}]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_script_detection() -> None:
    assert dominant_script(body("The quick brown fox")) == "latin"
    assert dominant_script(body("東京は日本の首都です。人口が多い。")) == "cjk"
    assert dominant_script({"messages": "nonsense"}) == "latin"


def test_factor_starts_at_one_and_learns_per_script(redis_conn: redis.Redis) -> None:
    clock = FakeClock()
    cal = Calibrator(redis_conn, clock=clock)
    latin, cjk = body("word " * 400), body("漢字" * 300)
    raw_latin, raw_cjk = estimate_prompt_tokens(latin), estimate_prompt_tokens(cjk)
    assert cal.estimate("kimi-k2-5", latin, raw_latin) == raw_latin
    # The provider counts Latin text at about half our raw estimate, CJK at 90 %.
    for _ in range(5):
        cal.record("kimi-k2-5", latin, raw_latin, raw_latin // 2)
        cal.record("kimi-k2-5", cjk, raw_cjk, int(raw_cjk * 0.9))
    assert cal.estimate("kimi-k2-5", latin, raw_latin) == raw_latin  # cached for a while
    clock.now += 60
    latin_est = cal.estimate("kimi-k2-5", latin, raw_latin)
    cjk_est = cal.estimate("kimi-k2-5", cjk, raw_cjk)
    assert raw_latin // 2 <= latin_est <= raw_latin // 2 * (1 + MAX_MARGIN) + 2
    assert int(raw_cjk * 0.9) <= cjk_est <= raw_cjk * 0.9 * (1 + MAX_MARGIN) + 2
    # Another model learns nothing from these.
    assert cal.estimate("other-model", latin, raw_latin) == raw_latin


def test_factor_follows_the_largest_recent_ratio(redis_conn: redis.Redis) -> None:
    clock = FakeClock()
    cal = Calibrator(redis_conn, clock=clock)
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    cal.record("kimi-k2-5", prompt, raw, raw // 2)
    cal.record("kimi-k2-5", prompt, raw, int(raw * 0.8))  # one call counted higher
    assert cal.estimate("kimi-k2-5", prompt, raw) >= int(raw * 0.8)
    # Shared: a second worker process sees the same samples.
    assert Calibrator(redis_conn).estimate("kimi-k2-5", prompt, raw) >= int(raw * 0.8)


def test_tiny_prompts_teach_nothing(redis_conn: redis.Redis) -> None:
    cal = Calibrator(redis_conn)
    cal.record("kimi-k2-5", body("hi"), 10, 3)
    assert cal.factor("kimi-k2-5", "latin") == 1.0


def test_margin_narrows_as_consistent_samples_come_in(redis_conn: redis.Redis) -> None:
    clock = FakeClock()
    cal = Calibrator(redis_conn, clock=clock)
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    for seen in range(1, TRUSTED_SAMPLES + 1):
        cal.record("kimi-k2-5", prompt, raw, raw // 2)
        clock.now += 60
        factor = cal.factor("kimi-k2-5", "latin")
        ratio = float(f"{(raw // 2) / raw:.4f}")
        expected = MIN_MARGIN if seen >= TRUSTED_SAMPLES else MAX_MARGIN
        assert factor == pytest.approx(ratio * (1 + expected))
    # Ratios spread by 3 %: the margin follows the spread.
    cal.record("kimi-k2-5", prompt, raw, round(raw / 2 * 1.03))
    clock.now += 60
    high = float(f"{round(raw / 2 * 1.03) / raw:.4f}")
    low = float(f"{(raw // 2) / raw:.4f}")
    assert cal.factor("kimi-k2-5", "latin") == pytest.approx(high * (1 + (high - low) / high))
