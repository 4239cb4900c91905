"""The benchmark's loads: exact prompt sizes, the other client's retries, the neighbour verdict."""

from __future__ import annotations

import random

import httpx
import pytest

from bench.loads import Attempt, chat_body, retry_wait
from bench.rows import Row
from bench.scenarios_neighbour import OTHER_MARKER, judge
from devstack.simulator.limits import prompt_tokens_for


@pytest.mark.parametrize("chars_per_token", [4.0, 3.0, 1.5])
@pytest.mark.parametrize("tokens", [250, 8000, 130_000])
def test_prompts_cost_what_the_simulator_counts(chars_per_token: float, tokens: int) -> None:
    body = chat_body("t", 7, tokens, 100, chars_per_token)
    assert prompt_tokens_for(body, chars_per_token) == tokens
    text = body["messages"][0]["content"]
    # CJK prompts are three bytes a character, so a byte-based estimate errs upwards there.
    assert (len(text.encode()) > 2 * len(text)) == (chars_per_token < 2.0)


def _reply(headers: dict[str, str]) -> httpx.Response:
    return httpx.Response(429, headers=headers)


def test_a_retry_waits_for_the_reset_of_the_exhausted_dimension() -> None:
    rng = random.Random(1)
    given = {"retry-after": "7"}
    assert retry_wait(_reply(given), 1, rng) == 7.0
    both = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1.5s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "12s",
    }
    assert retry_wait(_reply(both), 1, rng) == 12.0
    requests_only = both | {"x-ratelimit-remaining-tokens": "5000"}
    assert retry_wait(_reply(requests_only), 3, rng) == 1.5


def test_without_a_reset_a_retry_backs_off_like_the_openai_sdk() -> None:
    rng = random.Random(2)
    for try_number, full in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)):
        waits = [retry_wait(_reply({}), try_number, rng) for _ in range(50)]
        assert all(0.75 * full <= w <= full for w in waits), (try_number, min(waits), max(waits))


def _call(at: float, status: int, marker: str | None = None) -> dict[str, object]:
    return {
        "arrived_at": at,
        "admitted_at": at if status == 200 else None,
        "status": status,
        "marker": marker,
    }


def test_the_neighbour_verdict_counts_attempts_and_both_clients_in_the_span() -> None:
    begin, end, rpm = 1000.0, 1120.0, 10
    ours = [_call(begin + 6.0 * i, 200) for i in range(16)] + [_call(begin + 3.0, 429)]
    ours.append(_call(begin - 5.0, 429))  # before the span: left out
    theirs = [_call(begin + 10.0 + 30.0 * i, 200, OTHER_MARKER) for i in range(4)]
    attempts = [Attempt(begin + 9.0 + 30.0 * i, i, 1, 429) for i in range(4)]
    attempts += [Attempt(begin + 10.0 + 30.0 * i, i, 2, 200) for i in range(4)]
    attempts.append(Attempt(end + 1.0, 9, 1, 429))  # after the span: left out
    row = Row("neighbour-w1", "t")
    judge(row, ours + theirs, attempts, begin, end, rpm, headers=True)
    m = row.metrics
    assert (m["other_attempts"], m["other_refused"], m["other_refused_pct"]) == (8, 4, 50.0)
    assert m["other_requests_sent"] == 4 and m["other_admitted_per_min"] == 2.0
    assert (m["ours_calls"], m["ours_refused"]) == (17, 1)
    assert m["ours_refused_whole_run"] == 2
    # Ours: 10 then 6 a window; theirs: 2 and 2.
    assert m["together_admitted_per_window"] == "12, 8"
    assert m["together_pct_of_limit"] == 100.0
    verdicts = {t.label.split(":")[0]: t.met for t in row.targets}
    assert verdicts == {
        "the other client": False,
        "ours": False,
        "together >= 95% of the limit": True,
    }


def test_without_headers_the_neighbour_verdict_judges_only_our_refusals() -> None:
    row = Row("neighbour-noheaders-w1", "t")
    judge(row, [_call(5.0, 200)], [Attempt(5.0, 0, 1, 429)], 0.0, 60.0, 10, headers=False)
    assert [(t.label, t.met) for t in row.targets] == [("ours: < 1% of our calls refused", True)]
    assert row.metrics["other_refused_pct"] == 100.0
