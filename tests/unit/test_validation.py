"""check_request: what passes untouched, what is refused and how the refusal reads."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.jsoncheck import MAX_JSON_DEPTH
from jobs.tokens import estimate_prompt_tokens
from jobs.validation import (
    BatchValidationError,
    CheckedRequest,
    RequestLimits,
    ValidationError,
    check_request,
)
from tests.support import HEROKU_EXAMPLE, LIMITS

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def example(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(HEROKU_EXAMPLE)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_DROP = object()


def refuse(body: object, limits: RequestLimits = LIMITS, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        check_request(body, limits, **kwargs)
    return info.value


# --- good paths ----------------------------------------------------------------------------


def test_example_body_passes_and_is_returned_untouched() -> None:
    body = example()
    snapshot = copy.deepcopy(body)
    checked = check_request(body, LIMITS)
    assert isinstance(checked, CheckedRequest)
    assert checked.body is body
    assert body == snapshot
    assert (checked.model, checked.max_tokens) == ("kimi-k2-5", 100)
    assert checked.est_prompt_tokens == estimate_prompt_tokens(body)
    assert checked.est_prompt_tokens > 0


def test_minimal_body_and_unknown_fields_pass_through() -> None:
    body = {
        "model": "kimi-k2-5",
        "messages": [{"role": "user", "content": "hi"}],
        "logprobs": False,
        "user": "team-a",
        "metadata": {"anything": [1, 2, {"x": None}]},
    }
    checked = check_request(body, LIMITS)
    assert checked.body is body and checked.max_tokens is None


def test_nulls_count_as_absent_for_optional_fields() -> None:
    body = {
        "model": "kimi-k2-5",
        "messages": [{"role": "user", "content": "hi"}],
        **dict.fromkeys(
            [
                *("max_tokens", "temperature", "top_p", "n", "stream", "stop"),
                *("tools", "tool_choice", "extended_thinking"),
            ]
        ),
    }
    assert check_request(body, LIMITS).max_tokens is None


def test_tool_round_trip_conversation_passes() -> None:
    body = example(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "Weather in Portland?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Portland"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stop=["\n\n", "END"],
        n=1,
        extended_thinking={"enabled": True, "budget_tokens": 512, "include_reasoning": True},
    )
    assert check_request(body, LIMITS).body is body


def test_non_text_content_parts_pass() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = example(messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, image]}])
    check_request(body, LIMITS)


def test_any_model_is_accepted_without_known_models() -> None:
    open_limits = RequestLimits(context_tokens=1000, tpm=10_000, default_max_tokens=100)
    body = {"model": "some-other-model", "messages": [{"role": "user", "content": "hi"}]}
    assert check_request(body, open_limits).model == "some-other-model"


def test_max_tokens_exactly_filling_the_context_passes() -> None:
    body: dict[str, Any] = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "hi"}]}
    est = estimate_prompt_tokens(body)
    body["max_tokens"] = LIMITS.context_tokens - est
    assert check_request(body, LIMITS).max_tokens == LIMITS.context_tokens - est


# --- refusals, one per rule ----------------------------------------------------------------

Mutate = Callable[[dict[str, Any]], object]


def _set(path: str, value: Any) -> Mutate:
    """Set a value at a dotted path with [i] indexes, in a copy of the example."""

    def mutate(body: dict[str, Any]) -> object:
        target: Any = body
        parts = path.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        if value is _DROP:
            del target[int(last) if last.isdigit() else last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
        return body

    return mutate


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}

REFUSALS: list[tuple[str, Mutate, str, str]] = [
    ("body is a list", lambda b: [b], "body", "must be a JSON object, got list"),
    ("body is a string", lambda b: "hi", "body", "got string"),
    ("model missing", _set("model", _DROP), "body.model", "missing"),
    ("model empty", _set("model", ""), "body.model", "non-empty string"),
    ("model not a string", _set("model", 5), "body.model", "got 5"),
    (
        "model unknown",
        _set("model", "gpt-x"),
        "body.model",
        "model 'gpt-x' is served by no attachment",
    ),
    ("model too long", _set("model", "m" * 201), "body.model", "at most 200"),
    ("messages missing", _set("messages", _DROP), "body.messages", "missing"),
    ("messages not a list", _set("messages", {"role": "user"}), "body.messages", "got object"),
    ("messages empty", _set("messages", []), "body.messages", "at least one message"),
    ("message not an object", _set("messages[1]", "hi"), "body.messages[1]", "got string"),
    (
        "unknown role",
        _set("messages[0].role", "robot"),
        "body.messages[0].role",
        "unknown role 'robot' (expected one of assistant, developer, system, tool, user)",
    ),
    ("missing role", _set("messages[0].role", _DROP), "body.messages[0].role", "missing role"),
    ("content a number", _set("messages[2].content", 42), "body.messages[2].content", "integer"),
    ("content missing", _set("messages[0].content", _DROP), "body.messages[0].content", "null"),
    (
        "null content without tool_calls",
        _set("messages[1].content", None),
        "body.messages[1].content",
        "only an assistant message with tool_calls",
    ),
    ("content empty list", _set("messages[0].content", []), "body.messages[0].content", "empty"),
    (
        "content part not an object",
        _set("messages[0].content", ["hi"]),
        "body.messages[0].content[0]",
        "must be an object",
    ),
    (
        "content part without type",
        _set("messages[0].content", [{"text": "hi"}]),
        "body.messages[0].content[0].type",
        "non-empty string",
    ),
    (
        "text part without text",
        _set("messages[0].content", [{"type": "text", "text": 3}]),
        "body.messages[0].content[0].text",
        'needs a string "text"',
    ),
    (
        "tool message without tool_call_id",
        _set("messages[2]", {"role": "tool", "content": "rain"}),
        "body.messages[2].tool_call_id",
        "tool_call_id",
    ),
    (
        "tool_calls not a list",
        _set("messages[1].tool_calls", {"id": "c1"}),
        "body.messages[1].tool_calls",
        "non-empty list",
    ),
    (
        "tool_calls on a user message",
        _set("messages[0].tool_calls", [CALL]),
        "body.messages[0].tool_calls",
        "only assistant",
    ),
    (
        "tool call without id",
        _set("messages[1].tool_calls", [{**CALL, "id": None}]),
        "body.messages[1].tool_calls[0].id",
        "non-empty string",
    ),
    (
        "tool call of another type",
        _set("messages[1].tool_calls", [{**CALL, "type": "retrieval"}]),
        "body.messages[1].tool_calls[0].type",
        "must be 'function'",
    ),
    (
        "tool call arguments as an object",
        _set("messages[1].tool_calls", [{**CALL, "function": {"name": "f", "arguments": {}}}]),
        "body.messages[1].tool_calls[0].function.arguments",
        "must be a string",
    ),
    (
        "tool call function missing",
        _set("messages[1].tool_calls", [{"id": "c1", "type": "function"}]),
        "body.messages[1].tool_calls[0].function",
        "must be an object",
    ),
    ("tools not a list", _set("tools", {"type": "function"}), "body.tools", "non-empty list"),
    ("tools empty", _set("tools", []), "body.tools", "non-empty list"),
    ("tool not an object", _set("tools[0]", "get_weather"), "body.tools[0]", "must be an object"),
    ("tool of another type", _set("tools[0].type", "code"), "body.tools[0].type", "'function'"),
    (
        "tool without function",
        _set("tools[0].function", _DROP),
        "body.tools[0].function",
        "must be an object",
    ),
    (
        "tool name with spaces",
        _set("tools[0].function.name", "get weather"),
        "body.tools[0].function.name",
        "^[A-Za-z0-9_-]{1,64}$",
    ),
    (
        "tool name too long",
        _set("tools[0].function.name", "f" * 65),
        "body.tools[0].function.name",
        "must match",
    ),
    (
        "tool description not a string",
        _set("tools[0].function.description", ["x"]),
        "body.tools[0].function.description",
        "must be a string",
    ),
    (
        "tool parameters not an object",
        _set("tools[0].function.parameters", "city"),
        "body.tools[0].function.parameters",
        "JSON Schema",
    ),
    (
        "tool parameters of type array",
        _set("tools[0].function.parameters.type", "array"),
        "body.tools[0].function.parameters.type",
        "'array'",
    ),
    (
        "tool parameters properties not an object",
        _set("tools[0].function.parameters.properties", ["city"]),
        "body.tools[0].function.parameters.properties",
        "must be an object",
    ),
    (
        "duplicate tool names",
        lambda b: {**b, "tools": [b["tools"][0], b["tools"][0]]},
        "body.tools[1].function.name",
        "duplicate",
    ),
    ("tool_choice unknown", _set("tool_choice", "always"), "body.tool_choice", "'always'"),
    (
        "tool_choice names an undeclared tool",
        _set("tool_choice", {"type": "function", "function": {"name": "nope"}}),
        "body.tool_choice.function.name",
        "not among the declared tools (get_weather)",
    ),
    (
        "tool_choice name unhashable",
        _set("tool_choice", {"type": "function", "function": {"name": ["x"]}}),
        "body.tool_choice.function.name",
        "list",
    ),
    (
        "tool_choice without tools",
        lambda b: {k: v for k, v in b.items() if k != "tools"},
        "body.tool_choice",
        "no tools",
    ),
    ("max_tokens negative", _set("max_tokens", -5), "body.max_tokens", "integer >= 1, got -5"),
    ("max_tokens zero", _set("max_tokens", 0), "body.max_tokens", "got 0"),
    ("max_tokens bool", _set("max_tokens", True), "body.max_tokens", "got True"),
    ("max_tokens float", _set("max_tokens", 100.0), "body.max_tokens", "got 100.0"),
    ("max_tokens string", _set("max_tokens", "100"), "body.max_tokens", "got '100'"),
    (
        "max_tokens over the context",
        _set("max_tokens", 262_144),
        "body.max_tokens",
        "exceeds the model's 262144-token context",
    ),
    ("temperature too high", _set("temperature", 2.5), "body.temperature", "0 to 2"),
    ("temperature negative", _set("temperature", -0.1), "body.temperature", "0 to 2"),
    ("temperature a string", _set("temperature", "hot"), "body.temperature", "'hot'"),
    ("temperature bool", _set("temperature", True), "body.temperature", "True"),
    ("top_p zero", _set("top_p", 0), "body.top_p", "above 0"),
    ("top_p above one", _set("top_p", 1.5), "body.top_p", "at most 1"),
    ("n two", _set("n", 2), "body.n", "only n=1"),
    ("n true", _set("n", True), "body.n", "only n=1"),
    ("stream true", _set("stream", True), "body.stream", "streaming is not supported for batch"),
    ("stream a string", _set("stream", "no"), "body.stream", "boolean"),
    (
        "extended_thinking not an object",
        _set("extended_thinking", True),
        "body.extended_thinking",
        "must be an object",
    ),
    (
        "extended_thinking enabled not bool",
        _set("extended_thinking", {"enabled": "yes"}),
        "body.extended_thinking.enabled",
        "boolean",
    ),
    (
        "extended_thinking budget zero",
        _set("extended_thinking", {"enabled": True, "budget_tokens": 0}),
        "body.extended_thinking.budget_tokens",
        "integer >= 1",
    ),
    (
        "extended_thinking include_reasoning not bool",
        _set("extended_thinking", {"include_reasoning": 1}),
        "body.extended_thinking.include_reasoning",
        "boolean",
    ),
    ("stop a number", _set("stop", 7), "body.stop", "up to 4 strings"),
    ("stop too many", _set("stop", ["a", "b", "c", "d", "e"]), "body.stop", "up to 4"),
    ("stop with a number", _set("stop", ["a", 1]), "body.stop", "up to 4"),
    ("NUL in content", _set("messages[0].content", "a\x00b"), "body.messages[0].content", "NUL"),
    (
        "lone surrogate in a pass-through field",
        _set("user", "\udc00"),
        "body.user",
        "unpaired UTF-16 surrogate",
    ),
    ("NaN in a pass-through field", _set("seed", float("nan")), "body.seed", "nan"),
    ("infinite temperature", _set("temperature", float("inf")), "body.temperature", "inf"),
    ("a set in the body", _set("metadata", {1, 2}), "body.metadata", "set is not a JSON value"),
    ("a tuple where a list is due", _set("stop", ("a",)), "body.stop", "got tuple"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"),
    [pytest.param(m, f, frag, id=name) for name, m, f, frag in REFUSALS],
)
def test_refusals_name_the_field_and_the_reason(mutate: Mutate, field: str, fragment: str) -> None:
    error = refuse(mutate(example()))
    assert error.field == field
    assert fragment in error.reason
    assert error.line is None
    assert str(error) == f"{field}: {error.reason}"


def test_unknown_model_message_says_what_to_configure() -> None:
    error = refuse(example(model="llama-9"))
    assert str(error) == (
        "body.model: model 'llama-9' is served by no attachment (served: kimi-k2-5); to "
        "use it, attach one that serves it to INFERENCE_POOL, or set INFERENCE_MODEL_ID "
        "to it with its INFERENCE_RPM and INFERENCE_TPM"
    )


def test_a_request_that_can_never_fit_the_tpm_budget_is_refused() -> None:
    small = RequestLimits(context_tokens=262_144, tpm=1000, default_max_tokens=4096)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    error = refuse(body, small)
    assert error.field == "body.messages"
    assert "can never fit the tokens-per-minute budget of 1000" in error.reason
    assert "default max_tokens 4096" in error.reason
    body["max_tokens"] = 500
    assert check_request(body, small).max_tokens == 500
    body["max_tokens"] = 990
    assert "can never fit" in refuse(body, small).reason


def test_a_prompt_filling_the_context_without_max_tokens_is_refused() -> None:
    tiny = RequestLimits(context_tokens=100, tpm=1_000_000, default_max_tokens=10)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}
    error = refuse(body, tiny)
    assert error.field == "body.messages" and "100-token context" in error.reason


def test_field_prefix_is_used_and_can_be_empty() -> None:
    body = example(temperature=9)
    assert refuse(body, field_prefix="request").field == "request.temperature"
    assert refuse(body, field_prefix="").field == "temperature"
    assert refuse([], field_prefix="").field is None


def test_long_values_are_shortened_in_messages() -> None:
    error = refuse(example(model="x" * 10_000))
    assert len(str(error)) < 200


def test_deep_nesting_in_a_python_body_is_refused_without_recursion() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(10_000):
        node["k"] = {}
        node = node["k"]
    error = refuse(example(metadata=deep))
    assert f"nested more than {MAX_JSON_DEPTH} levels deep" in error.reason
    assert error.field is not None and error.field.startswith("body.metadata.k.k")
    nested: Any = []
    for _ in range(MAX_JSON_DEPTH - 2):
        nested = [nested]
    check_request(example(metadata=nested), LIMITS)  # body + 63 levels: at the limit


def test_circular_body_is_refused() -> None:
    loop: dict[str, Any] = {}
    loop["again"] = loop
    assert "nested more than" in refuse(example(metadata=loop)).reason


def test_huge_integers_are_refused_cleanly() -> None:
    error = refuse(example(temperature=10**5000))
    assert error.field == "body.temperature" and "too large" in error.reason
    error = refuse(example(temperature=10**100))
    assert error.field == "body.temperature" and "got integer" in error.reason
    assert refuse(example(max_tokens=10**400)).field == "body.max_tokens"


def test_keys_that_json_turns_into_strings_pass_through() -> None:
    keys: dict[Any, str] = {3: "a", True: "b", None: "c", 2.5: "d"}
    check_request(example(metadata=keys), LIMITS)
    # The field-locating walk accepts the same keys and finds the real problem.
    error = refuse(example(metadata={**keys, "x": "\x00"}))
    assert error.field == "body.metadata.x" and "NUL" in error.reason
    assert "not a string" in refuse(example(metadata={(1, 2): "a"})).reason


def test_escaped_backslash_u0000_text_is_fine() -> None:
    # The literal text \u0000 (backslash, u, digits) is not a NUL character.
    check_request(example(user="\\u0000 and \\ud800"), LIMITS)


# --- error objects --------------------------------------------------------------------------


def test_validation_error_message_names_line_and_field() -> None:
    error = ValidationError(
        "unknown role 'robot'", field="body.messages[0].role", line=12, label="line"
    )
    assert str(error) == "line 12: body.messages[0].role: unknown role 'robot'"
    assert isinstance(error, ValueError)
    assert str(ValidationError("file is empty")) == "file is empty"
    assert str(ValidationError("bad", line=3, label="request")) == "request 3: bad"
    moved = ValidationError("bad", field="body").at(4, "request")
    assert (str(moved), moved.line, moved.field) == ("request 4: body: bad", 4, "body")


def test_errors_survive_pickling() -> None:
    error = ValidationError("bad", field="body.n", line=2, label="request")
    copy_ = pickle.loads(pickle.dumps(error))
    assert (str(copy_), copy_.field, copy_.line) == (str(error), "body.n", 2)
    batch = BatchValidationError([error, error.at(5, "request")], total=9)
    again = pickle.loads(pickle.dumps(batch))
    assert str(again) == str(batch) and again.total == 9 and len(again.errors) == 2


def test_batch_error_lists_the_first_twenty_and_counts_all() -> None:
    errors = [ValidationError("bad", field="url", line=n) for n in range(1, 31)]
    batch = BatchValidationError(errors, total=30)
    text = str(batch)
    assert text.startswith("30 problems found, first 20 shown:")
    assert "line 20: url: bad" in text and "line 21:" not in text
    assert text.endswith("... and 10 more")
    assert len(batch.errors) == 20 and batch.total == 30
    assert isinstance(batch, ValidationError)


def test_batch_error_with_one_problem_reads_like_that_problem() -> None:
    only = ValidationError("bad", field="body.n", line=7)
    batch = BatchValidationError([only])
    assert str(batch) == "line 7: body.n: bad"
    assert (batch.line, batch.field, batch.reason, batch.total) == (7, "body.n", "bad", 1)


def test_batch_error_needs_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BatchValidationError([])


# --- fuzzing --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["user", "assistant", "tool", "function", "text", "auto", "kimi-k2-5"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "messages",
                    "role",
                    "content",
                    "type",
                    "text",
                    "tools",
                    "function",
                    "name",
                    "parameters",
                    "tool_choice",
                    "tool_calls",
                    "id",
                    "arguments",
                    "max_tokens",
                    "temperature",
                    "top_p",
                    "n",
                    "stream",
                    "stop",
                    "extended_thinking",
                    "enabled",
                    "budget_tokens",
                    "tool_call_id",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@FUZZ
@given(json_values)
def test_arbitrary_values_either_pass_or_raise_validation_error(value: object) -> None:
    try:
        checked = check_request(value, LIMITS)
    except ValidationError as exc:
        assert str(exc)
    else:
        assert checked.body is value


def mostly(valid: st.SearchStrategy[Any], broken: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values that are valid about nine times in ten."""
    return st.integers(0, 9).flatmap(lambda pick: broken if pick == 0 else valid)


def _message(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


near_valid_message = st.builds(
    _message,
    mostly(
        st.sampled_from(["user", "assistant", "system", "developer"]),
        st.sampled_from(["tool", "robot", ""]),
    ),
    mostly(
        st.text(max_size=30),
        st.one_of(
            st.none(),
            st.integers(),
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url", ""])},
                    optional={"text": st.one_of(st.text(max_size=10), st.integers())},
                ),
                max_size=3,
            ),
        ),
    ),
)

tool_names = st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True)

near_valid_tool = st.fixed_dictionaries(
    {
        "type": mostly(st.just("function"), st.just("other")),
        "function": st.fixed_dictionaries(
            {"name": mostly(tool_names, st.from_regex(r"[A-Za-z0-9_ -]{0,70}", fullmatch=True))},
            optional={
                "description": mostly(st.text(max_size=20), st.integers()),
                "parameters": st.fixed_dictionaries(
                    {"type": mostly(st.just("object"), st.just("array"))}
                ),
            },
        ),
    }
)

near_valid_body = st.fixed_dictionaries(
    {
        "model": mostly(st.just("kimi-k2-5"), st.sampled_from(["other", ""])),
        "messages": mostly(st.lists(near_valid_message, min_size=1, max_size=4), st.just([])),
    },
    optional={
        "max_tokens": mostly(
            st.integers(1, 4096), st.one_of(st.integers(-2, 300_000), st.booleans(), st.floats())
        ),
        "temperature": mostly(st.floats(0, 2), st.one_of(st.floats(), st.integers(-1, 3))),
        "top_p": mostly(st.floats(0.01, 1), st.floats()),
        "n": mostly(st.just(1), st.integers(0, 3)),
        "stream": mostly(st.just(False), st.one_of(st.just(True), st.text(max_size=3))),
        "stop": mostly(
            st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=4)),
            st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=6),
        ),
        "tools": mostly(st.lists(near_valid_tool, min_size=1, max_size=3), st.just([])),
        "tool_choice": st.one_of(
            st.sampled_from(["auto", "none", "required", "sometimes"]),
            st.fixed_dictionaries(
                {
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": tool_names}),
                }
            ),
        ),
        "extended_thinking": mostly(
            st.fixed_dictionaries(
                {},
                optional={
                    "enabled": st.booleans(),
                    "budget_tokens": st.integers(1, 5000),
                    "include_reasoning": st.booleans(),
                },
            ),
            st.one_of(st.booleans(), st.fixed_dictionaries({"budget_tokens": st.integers(-1, 0)})),
        ),
    },
)


@FUZZ
@given(near_valid_body)
def test_near_valid_requests_pass_with_a_consistent_result_or_raise_validation_error(
    body: dict[str, Any],
) -> None:
    snapshot = json.dumps(body, sort_keys=True)
    try:
        checked = check_request(body, LIMITS)
    except ValidationError as exc:
        assert exc.field is not None and exc.field.startswith("body")
    else:
        assert checked.body is body
        assert checked.model == body["model"] == "kimi-k2-5"
        assert body["messages"]
        max_tokens = checked.max_tokens
        assert max_tokens is None or checked.est_prompt_tokens + max_tokens <= 262_144
        assert body.get("stream") is not True
    assert json.dumps(body, sort_keys=True) == snapshot  # never modified


@pytest.mark.parametrize(
    ("fields", "budget"),
    [
        ({"max_completion_tokens": 300}, 300),
        ({"max_tokens": 200}, 200),
        ({"max_completion_tokens": 250, "max_tokens": 250}, 250),
        ({}, None),
    ],
    ids=["new-name", "old-name", "both-agree", "neither"],
)
def test_either_name_of_the_completion_budget_counts(
    fields: dict[str, int], budget: int | None
) -> None:
    body = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "hi"}], **fields}
    assert check_request(body, LIMITS).max_tokens == budget


def test_max_completion_tokens_is_held_to_the_context_and_must_agree() -> None:
    base = {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError, match="exceeds the model's 262144-token context"):
        check_request(base | {"max_completion_tokens": 262_144}, LIMITS)
    with pytest.raises(ValidationError) as conflict:
        check_request(base | {"max_completion_tokens": 10, "max_tokens": 20}, LIMITS)
    assert conflict.value.field == "body.max_completion_tokens"
    with pytest.raises(ValidationError) as bad:
        check_request(base | {"max_completion_tokens": 0}, LIMITS)
    assert bad.value.field == "body.max_completion_tokens"
