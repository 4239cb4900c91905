"""The prompt-token estimate learns the provider's tokenizer, per model and script, from
the ledger: each answered call's row holds its raw estimate, script and prompt_tokens."""

from __future__ import annotations

import pytest
import redis

from jobs.calibration import (
    CACHE_S,
    LEARNING_CACHE_S,
    MAX_MARGIN,
    MIN_MARGIN,
    TRUSTED_SAMPLES,
    TRUSTED_TOKENS,
    Calibrator,
)
from jobs.tokens import Script, dominant_script, estimate_prompt_tokens
from tests.integration.ledger_helpers import answered, body

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_script_detection() -> None:
    assert dominant_script(body("The quick brown fox")) == "latin"
    assert dominant_script(body("東京は日本の首都です。人口が多い。")) == "cjk"
    assert dominant_script({"messages": "nonsense"}) == "latin"


def test_factor_starts_at_one_and_learns_per_script(clean_db: str) -> None:
    clock = FakeClock()
    cal = Calibrator(clean_db, clock=clock)
    latin, cjk = body("word " * 400), body("漢字" * 300)
    raw_latin, raw_cjk = estimate_prompt_tokens(latin), estimate_prompt_tokens(cjk)
    assert cal.estimate("kimi-k2-5", dominant_script(latin), raw_latin) == raw_latin
    # The provider counts Latin text at about half our raw estimate, CJK at 90 %.
    for _ in range(5):
        answered(clean_db, latin, raw_latin, raw_latin // 2)
        answered(clean_db, cjk, raw_cjk, int(raw_cjk * 0.9))
    assert (
        cal.estimate("kimi-k2-5", dominant_script(latin), raw_latin) == raw_latin
    )  # cached for a while
    clock.now += 60
    latin_est = cal.estimate("kimi-k2-5", dominant_script(latin), raw_latin)
    cjk_est = cal.estimate("kimi-k2-5", dominant_script(cjk), raw_cjk)
    assert raw_latin // 2 <= latin_est <= raw_latin // 2 * (1 + MAX_MARGIN) + 2
    assert int(raw_cjk * 0.9) <= cjk_est <= raw_cjk * 0.9 * (1 + MAX_MARGIN) + 2
    # Another model learns nothing from these.
    assert cal.estimate("other-model", dominant_script(latin), raw_latin) == raw_latin


def test_factor_follows_the_largest_recent_ratio(clean_db: str) -> None:
    cal = Calibrator(clean_db, clock=FakeClock())
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    answered(clean_db, prompt, raw, raw // 2)
    answered(clean_db, prompt, raw, int(raw * 0.8))  # one call counted higher
    assert cal.estimate("kimi-k2-5", dominant_script(prompt), raw) >= int(raw * 0.8)
    # Shared: a second worker process sees the same samples.
    assert Calibrator(clean_db).estimate("kimi-k2-5", dominant_script(prompt), raw) >= int(
        raw * 0.8
    )


def test_first_answers_reprice_at_once_then_the_factor_is_cached(clean_db: str) -> None:
    clock = FakeClock()
    cal = Calibrator(clean_db, clock=clock)
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    assert cal.factor("kimi-k2-5", "latin") == 1.0
    answered(clean_db, prompt, raw, raw // 2)
    # While learning, a new answer is read within LEARNING_CACHE_S, not CACHE_S.
    clock.now += LEARNING_CACHE_S
    assert cal.factor("kimi-k2-5", "latin") < 0.6
    for _ in range(TRUSTED_SAMPLES):
        answered(clean_db, prompt, raw, raw // 2)
    clock.now += LEARNING_CACHE_S
    learnt = cal.factor("kimi-k2-5", "latin")
    answered(clean_db, prompt, raw, raw)  # counted twice as high: the factor must rise
    clock.now += CACHE_S / 2
    assert cal.factor("kimi-k2-5", "latin") == learnt  # trusted: cached for CACHE_S
    clock.now += CACHE_S / 2
    assert cal.factor("kimi-k2-5", "latin") > 1.0


def test_an_answer_recorded_here_is_read_at_once_while_learning(clean_db: str) -> None:
    """The runner says when it recorded an answer: a factor still learning is read again
    at the next ask instead of after LEARNING_CACHE_S; a trusted one stays cached."""
    cal = Calibrator(clean_db, clock=FakeClock())
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    assert cal.factor("kimi-k2-5", "latin") == 1.0
    answered(clean_db, prompt, raw, raw // 2)
    assert cal.factor("kimi-k2-5", "latin") == 1.0  # cached: the clock has not moved
    cal.answered()
    first = cal.factor("kimi-k2-5", "latin")
    assert first == pytest.approx(0.5 * (1 + MAX_MARGIN), rel=0.01)
    for _ in range(TRUSTED_SAMPLES):
        answered(clean_db, prompt, raw, raw // 2)
    cal.answered()
    trusted = cal.factor("kimi-k2-5", "latin")
    assert trusted < first
    answered(clean_db, prompt, raw, raw)
    cal.answered()
    assert cal.factor("kimi-k2-5", "latin") == trusted  # trusted: cached for CACHE_S


def test_an_answer_recorded_during_a_read_is_not_lost(clean_db: str) -> None:
    """A read that began before an answer was recorded is already old: the next ask reads
    again rather than keep it for LEARNING_CACHE_S."""

    class AnsweredMeanwhile(Calibrator):
        def samples(self, model: str, script: Script) -> list[tuple[int, int]]:
            found = super().samples(model, script)
            answered(clean_db, prompt, raw, raw // 2)  # recorded while this read runs
            self.answered()
            return found

    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    cal = AnsweredMeanwhile(clean_db, clock=FakeClock())
    assert cal.factor("kimi-k2-5", "latin") == 1.0  # read before the answer
    assert cal.factor("kimi-k2-5", "latin") < 0.6  # the clock has not moved: read again


def test_two_long_prompts_are_trusted_like_many_short_ones(clean_db: str) -> None:
    """A long prompt's ratio averages over all its text: two that count TRUSTED_TOKENS
    between them narrow the margin to their spread, one alone does not."""
    clock = FakeClock()
    cal = Calibrator(clean_db, clock=clock)
    prompt = body("word " * 400)
    raw = TRUSTED_TOKENS
    answered(clean_db, prompt, raw, raw // 2)
    assert cal.factor("kimi-k2-5", "latin") == pytest.approx(0.5 * (1 + MAX_MARGIN))
    answered(clean_db, prompt, raw, raw // 2)
    clock.now += LEARNING_CACHE_S
    assert cal.factor("kimi-k2-5", "latin") == pytest.approx(0.5 * (1 + MIN_MARGIN))
    # Two short ones are not enough.
    cjk = body("漢字" * 300)
    answered(clean_db, cjk, 1000, 500)
    answered(clean_db, cjk, 1000, 500)
    assert cal.factor("kimi-k2-5", "cjk") == pytest.approx(0.5 * (1 + MAX_MARGIN))


def test_the_calibration_outlives_redis(clean_db: str, redis_conn: redis.Redis) -> None:
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    for _ in range(TRUSTED_SAMPLES):
        answered(clean_db, prompt, raw, raw // 2)
    redis_conn.flushdb()
    # A new deployment: a new process, nothing cached, Redis empty.
    assert Calibrator(clean_db).estimate("kimi-k2-5", dominant_script(prompt), raw) < raw * 0.55


def test_tiny_prompts_and_unanswered_calls_teach_nothing(clean_db: str) -> None:
    cal = Calibrator(clean_db)
    answered(clean_db, body("hi"), 10, 3)
    prompt = body("word " * 400)
    answered(clean_db, prompt, estimate_prompt_tokens(prompt), 0)  # no usage reported
    assert cal.samples("kimi-k2-5", "latin") == []
    assert cal.factor("kimi-k2-5", "latin") == 1.0


def test_margin_narrows_as_consistent_samples_come_in(clean_db: str) -> None:
    clock = FakeClock()
    cal = Calibrator(clean_db, clock=clock)
    prompt = body("word " * 400)
    raw = estimate_prompt_tokens(prompt)
    for seen in range(1, TRUSTED_SAMPLES + 1):
        answered(clean_db, prompt, raw, raw // 2)
        clock.now += 60
        factor = cal.factor("kimi-k2-5", "latin")
        ratio = (raw // 2) / raw
        expected = MIN_MARGIN if seen >= TRUSTED_SAMPLES else MAX_MARGIN
        assert factor == pytest.approx(ratio * (1 + expected))
    # Ratios spread by 3 %: the margin follows the spread.
    answered(clean_db, prompt, raw, round(raw / 2 * 1.03))
    clock.now += 60
    high, low = round(raw / 2 * 1.03) / raw, (raw // 2) / raw
    assert cal.factor("kimi-k2-5", "latin") == pytest.approx(high * (1 + (high - low) / high))


def test_the_completion_share_follows_the_longest_recent_answer(clean_db: str) -> None:
    """Where the provider charges actual usage, an answer is reserved at the share of
    max_tokens recent answers used: all of it until TRUSTED_SAMPLES answers were seen,
    and all of it again once one answer used all its budget."""
    clock = FakeClock()
    cal = Calibrator(clean_db, clock=clock)
    prompt = body("word " * 400)
    for used in range(1, TRUSTED_SAMPLES):
        answered(clean_db, prompt, 1000, 500, completion=10 * used, max_tokens=1000)
    assert cal.completion_share("kimi-k2-5") == 1.0
    answered(clean_db, prompt, 1000, 500, completion=40, max_tokens=1000)
    answered(clean_db, prompt, 1000, 500, completion=5)  # no budget recorded: not a sample
    clock.now += LEARNING_CACHE_S
    longest = 10 * (TRUSTED_SAMPLES - 1) / 1000
    assert cal.completion_share("kimi-k2-5") == pytest.approx(longest * (1 + MAX_MARGIN))
    assert cal.completion_share("other-model") == 1.0
    answered(clean_db, prompt, 1000, 500, completion=200, max_tokens=200)  # cut at max_tokens
    clock.now += CACHE_S
    assert cal.completion_share("kimi-k2-5") == 1.0
