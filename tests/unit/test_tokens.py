"""Prompt-token estimation: high rather than low, monotonic, byte-based, cheap."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.simulator.limits import prompt_tokens_for
from jobs.tokens import (
    BYTES_PER_TOKEN,
    FIXED_OVERHEAD,
    MESSAGE_OVERHEAD,
    TOOL_CALL_OVERHEAD,
    TOOL_RESULT_OVERHEAD,
    TOOLS_OVERHEAD,
    estimate_prompt_tokens,
    text_of_content,
    text_tokens,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Fetches the current weather for a given city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def body(*contents: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": "kimi-k2-5",
        "messages": [{"role": "user", "content": c} for c in contents],
        **extra,
    }


def test_single_message_is_overheads_plus_bytes_over_three() -> None:
    est = estimate_prompt_tokens(body("abcdefg"))  # 7 bytes -> 3 tokens
    assert est == FIXED_OVERHEAD + MESSAGE_OVERHEAD + 3


def test_text_tokens_rounds_up() -> None:
    assert [text_tokens("a" * n) for n in range(7)] == [0, 1, 1, 1, 2, 2, 2]


def test_cjk_costs_about_one_token_per_character_latin_one_per_three() -> None:
    cjk = "天気はどうですか" * 50  # 400 characters, 3 UTF-8 bytes each
    latin = "weather!" * 50  # 400 ASCII characters
    base = FIXED_OVERHEAD + MESSAGE_OVERHEAD
    assert estimate_prompt_tokens(body(cjk)) - base == 400
    assert estimate_prompt_tokens(body(latin)) - base == math.ceil(400 / 3)
    assert estimate_prompt_tokens(body(cjk)) > 2 * estimate_prompt_tokens(body(latin))


def test_four_byte_characters_are_not_undercounted() -> None:
    emoji = "\U0001f600" * 30  # 4 bytes each
    assert estimate_prompt_tokens(body(emoji)) - FIXED_OVERHEAD - MESSAGE_OVERHEAD == 40


def test_adding_a_message_or_text_never_lowers_the_estimate() -> None:
    one = estimate_prompt_tokens(body("hello"))
    two = estimate_prompt_tokens(body("hello", "again"))
    longer = estimate_prompt_tokens(body("hello, and a much longer question"))
    assert two >= one + MESSAGE_OVERHEAD
    assert longer > one


def test_tools_are_charged_by_their_json() -> None:
    without = estimate_prompt_tokens(body("hi"))
    with_tools = estimate_prompt_tokens(body("hi", tools=[WEATHER_TOOL]))
    schema_bytes = len(json.dumps([WEATHER_TOOL], separators=(",", ":")))
    assert with_tools - without == TOOLS_OVERHEAD + math.ceil(schema_bytes / BYTES_PER_TOKEN)


def test_tool_calls_and_tool_results_are_charged() -> None:
    arguments = json.dumps({"city": "Portland, Oregon"})
    request = {
        "model": "kimi-k2-5",
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "rain, 9 C"},
        ],
    }
    without_call = {**request, "messages": [request["messages"][0]]}
    difference = estimate_prompt_tokens(request) - estimate_prompt_tokens(without_call)
    call_text = text_tokens("call_1") + text_tokens("get_weather") + text_tokens(arguments)
    tool_reply = (
        MESSAGE_OVERHEAD + TOOL_RESULT_OVERHEAD + text_tokens("rain, 9 C") + text_tokens("call_1")
    )
    assert difference == MESSAGE_OVERHEAD + TOOL_CALL_OVERHEAD + call_text + tool_reply


def test_reasoning_echoed_back_in_history_is_charged() -> None:
    plain = {"role": "assistant", "content": "ok"}
    with_reasoning = {**plain, "reasoning_content": "x" * 300}
    low = estimate_prompt_tokens({"messages": [plain]})
    high = estimate_prompt_tokens({"messages": [with_reasoning]})
    assert high - low == 100


def test_text_of_content_handles_strings_parts_and_null() -> None:
    assert text_of_content("plain") == "plain"
    assert text_of_content(None) == ""
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert text_of_content(parts) == "one\ntwo"
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    mixed = text_of_content([{"type": "text", "text": "look"}, image])
    assert mixed.startswith("look\n") and "example.com/a.png" in mixed


def test_estimate_tolerates_malformed_bodies() -> None:
    assert estimate_prompt_tokens({}) == FIXED_OVERHEAD
    assert estimate_prompt_tokens({"messages": "nope"}) == FIXED_OVERHEAD
    odd = {"messages": [5, {"content": 7, "tool_calls": ["x", {"function": 3}]}]}
    assert estimate_prompt_tokens(odd) > FIXED_OVERHEAD + 2 * MESSAGE_OVERHEAD
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    assert estimate_prompt_tokens({"messages": [{"content": [cyclic]}]}) >= FIXED_OVERHEAD
    assert estimate_prompt_tokens({"messages": [{"content": "\ud800"}]}) > FIXED_OVERHEAD


def test_many_estimates_are_cheap_enough_to_run_per_line() -> None:
    # A count-based check: 100k estimates complete (the per-test timeout is the guard),
    # and identical bodies give identical, deterministic figures.
    request = body("What's the weather like in Portland, Oregon right now?", tools=[WEATHER_TOOL])
    figures = {estimate_prompt_tokens(request) for _ in range(100_000)}
    assert len(figures) == 1


message_text = st.text(max_size=200)
messages = st.lists(
    st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(["system", "user", "assistant", "developer"]),
        st.one_of(
            message_text,
            st.lists(st.builds(lambda t: {"type": "text", "text": t}, message_text), max_size=3),
        ),
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(messages, st.booleans())
def test_estimate_is_never_below_the_simulators_count(
    msgs: list[dict[str, Any]], with_tools: bool
) -> None:
    request: dict[str, Any] = {"model": "kimi-k2-5", "messages": msgs}
    if with_tools:
        request["tools"] = [WEATHER_TOOL]
    assert estimate_prompt_tokens(request) >= prompt_tokens_for(request, 4.0)


@FUZZ
@given(messages, message_text)
def test_appending_text_is_monotonic(msgs: list[dict[str, Any]], extra: str) -> None:
    before = estimate_prompt_tokens({"messages": msgs})
    grown = [*msgs, {"role": "user", "content": extra}]
    assert estimate_prompt_tokens({"messages": grown}) >= before + MESSAGE_OVERHEAD
    last = msgs[-1]
    if isinstance(last["content"], str):
        longer = [*msgs[:-1], {**last, "content": last["content"] + extra}]
        assert estimate_prompt_tokens({"messages": longer}) >= before
