"""OpenAI Batch files: streaming validation of input lines, normalisation, output lines."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.batchfile import (
    MAX_CUSTOM_ID_CHARS,
    MAX_JSON_DEPTH,
    MAX_LINE_BYTES,
    BatchItem,
    normalize_requests,
    output_line,
    read_batch_file,
    read_batch_stream,
    write_output,
)
from jobs.validation import BatchValidationError, ValidationError
from tests.support import HEROKU_EXAMPLE, LIMITS, body, jsonl, line

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def read(data: bytes) -> list[BatchItem]:
    return read_batch_stream(io.BytesIO(data), LIMITS)


def problems(data: bytes) -> BatchValidationError:
    with pytest.raises(BatchValidationError) as info:
        read(data)
    return info.value


def only_problem(data: bytes) -> ValidationError:
    error = problems(data)
    assert error.total == 1, str(error)
    return error.errors[0]


# --- reading good files ---------------------------------------------------------------------


def test_a_good_file_gives_items_in_order_with_physical_line_numbers() -> None:
    data = jsonl(line("a")) + b"\n   \n" + jsonl(line("b"), line("c"))
    items = read(data)
    assert [(i.line, i.custom_id) for i in items] == [(1, "a"), (4, "b"), (5, "c")]
    assert items[0].request.body == body("question a")
    assert items[0].request.model == "kimi-k2-5"
    assert items[0].request.est_prompt_tokens > 0


def test_heroku_example_body_in_a_line_passes() -> None:

    items = read(jsonl(line("weather", body=HEROKU_EXAMPLE)))
    assert items[0].request.body == HEROKU_EXAMPLE and items[0].request.max_tokens == 100


def test_crlf_bom_and_missing_final_newline_are_accepted() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(line("a")).encode() + b"\r\n"
    data += json.dumps(line("b")).encode()
    assert [i.custom_id for i in read(data)] == ["a", "b"]


def test_read_batch_file_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(line("a"), line("b")))
    assert len(read_batch_file(path, LIMITS)) == 2
    assert len(read_batch_file(str(path), LIMITS)) == 2


def test_custom_id_at_the_length_limit_passes() -> None:
    custom_id = "x" * MAX_CUSTOM_ID_CHARS
    assert read(jsonl(line(custom_id)))[0].custom_id == custom_id


# --- reading bad files ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\r\n\t\n"], ids=["empty", "newline", "blank"])
def test_empty_file_is_refused(data: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        read(data)
    assert str(info.value) == "file is empty"
    assert not isinstance(info.value, BatchValidationError)


def test_non_utf8_names_the_line_and_byte() -> None:
    data = jsonl(line("a")) + b'{"custom_id": "\xff\xfe"}\n'
    error = only_problem(data)
    assert str(error) == "line 2: not valid UTF-8 at byte 16"


def test_invalid_json_names_the_line_and_column() -> None:
    error = only_problem(jsonl(line("a"), line("b")) + b'{"custom_id": "c",}\n')
    assert error.line == 3 and "not valid JSON" in error.reason and "column" in error.reason


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[1, 2]", "expected a JSON object with custom_id, method, url and body, got list"),
        (b"42", "got integer"),
        (b'"text"', "got string"),
        (b'{"custom_id": "a", "x": NaN}', "NaN is not valid JSON"),
        (b'{"custom_id": "a", "x": 1e400}', "too large"),
        (b'{"custom_id": "a", "x": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_lines_that_are_not_batch_objects(raw: bytes, fragment: str) -> None:
    error = only_problem(raw + b"\n")
    assert error.line == 1 and fragment in error.reason


def test_deeply_nested_line_is_refused_without_recursing() -> None:
    deep = b'{"custom_id": "d", "body": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n"
    data = jsonl(line("a")) + deep + jsonl(line("b", method="GET"))
    error = problems(data)
    assert error.total == 2
    assert str(error.errors[0]) == f"line 2: JSON nested more than {MAX_JSON_DEPTH} levels deep"
    assert error.errors[1].line == 3


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = "[{" * 5000 + '" \\" ' + "}]" * 5000
    items = read(jsonl(line("a", body=body(text))))
    assert items[0].request.body["messages"][0]["content"] == text


def test_unterminated_string_full_of_quotes_is_scanned_in_linear_time() -> None:
    # A quadratic scan would take hours here; the per-test timeout is the guard.
    data = b"[" * (MAX_JSON_DEPTH + 1) + b'"' + b'\\"' * 1_000_000 + b"\n"
    error = only_problem(data)
    assert error.line == 1


def test_nesting_at_the_limit_is_accepted() -> None:
    nested: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH - 2):  # line object + body + 62 lists = 64 levels
        nested = [nested]
    items = read(jsonl(line("a", body=body(metadata=nested))))
    assert len(items) == 1


def test_an_over_long_line_is_skipped_and_reading_continues(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as fh:
        fh.write(jsonl(line("a")))
        fh.write(b'{"custom_id": "huge", "pad": "' + b"x" * MAX_LINE_BYTES + b'"}\n')
        fh.write(jsonl(line("b"), line("c", url="/v1/embeddings")))
    error = problems(path.read_bytes())
    assert [(e.line, e.reason) for e in error.errors] == [
        (2, f"too long: more than {MAX_LINE_BYTES} bytes"),
        (4, "only /v1/chat/completions is supported, got '/v1/embeddings'"),
    ]


def test_an_over_long_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl(line("a")) + b"y" * (MAX_LINE_BYTES + 5))
    error = only_problem(path.read_bytes())
    assert error.line == 2 and "too long" in error.reason


def test_a_line_exactly_at_the_limit_is_parsed() -> None:
    row = json.dumps(line("a", body=body("")))
    pad = MAX_LINE_BYTES - len(row)  # the final newline is not counted
    big = row.replace('"content": ""', '"content": "' + "z" * pad + '"').encode() + b"\n"
    assert len(big) == MAX_LINE_BYTES + 1
    error = only_problem(big)
    # Parsed and validated: refused for its size in tokens, not in bytes.
    assert error.field == "body.messages" and "context" in error.reason


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"method": "POST", "url": "/v1/chat/completions", "body": {}}, "custom_id", "missing"),
        (line(""), "custom_id", "must not be empty"),
        (line(7), "custom_id", "must be a string, got integer"),  # type: ignore[arg-type]
        (line("x" * 10_240), "custom_id", "10240 characters long (at most 512)"),
        (line("a\x00b"), "custom_id", "NUL"),
        (line("a", method="GET"), "method", "must be 'POST', got 'GET'"),
        ({k: v for k, v in line("a").items() if k != "method"}, "method", "got None"),
        (line("a", url="/v1/embeddings"), "url", "only /v1/chat/completions is supported"),
        ({k: v for k, v in line("a").items() if k != "body"}, "body", "missing"),
        (line("a", body=[]), "body", "must be a JSON object"),
        (line("a", body={"messages": [{"role": "user", "content": "x"}]}), "body.model", "missing"),
        (line("a", body={"model": "kimi-k2-5"}), "body.messages", "missing"),
        (line("a", body=body(max_tokens=-1)), "body.max_tokens", "got -1"),
        (line("a", body=body(max_tokens=0)), "body.max_tokens", "got 0"),
        (line("a", body=body(max_tokens=300_000)), "body.max_tokens", "context"),
        (
            line("a", body=body(tools=[{"type": "function", "function": {"name": "bad name"}}])),
            "body.tools[0].function.name",
            "must match",
        ),
        (
            line(
                "a",
                body=body(
                    tools=[{"type": "function", "function": {"name": "f", "parameters": {"a": 1}}}]
                ),
            ),
            "body.tools[0].function.parameters.type",
            "JSON Schema",
        ),
        (line("a", body=body(text="a\x00b")), "body.messages[0].content", "NUL"),
    ],
)
def test_bad_lines_name_line_field_and_reason(row: Any, field: str, fragment: str) -> None:
    error = only_problem(jsonl(line("ok"), row))
    assert (error.line, error.field) == (2, field)
    assert fragment in error.reason
    assert str(error).startswith(f"line 2: {field}: ")
    assert len(str(error)) < 300  # a 10 KB custom_id is not echoed back whole


def test_lone_surrogate_escape_is_refused() -> None:
    raw = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
    raw += b'"body": {"model": "kimi-k2-5", "messages": [{"role": "user", "content": "\\ud800"}]}}'
    error = only_problem(raw + b"\n")
    assert error.field == "body.messages[0].content" and "surrogate" in error.reason


def test_custom_id_with_a_lone_surrogate_is_refused() -> None:
    raw = b'{"custom_id": "a\\udc00", "method": "POST", "url": "/v1/chat/completions"}'
    error = only_problem(raw + b"\n")
    assert error.field == "custom_id" and "surrogate" in error.reason


def test_duplicate_custom_id_names_both_lines() -> None:
    error = only_problem(jsonl(line("r1"), line("r2"), line("r1")))
    assert str(error) == "line 3: custom_id: duplicate custom_id 'r1' (first used on line 1)"


def test_duplicate_is_found_even_when_the_first_line_is_also_bad() -> None:
    error = problems(jsonl(line("r1", body={}), line("r1")))
    assert [e.line for e in error.errors] == [1, 2]
    assert "first used on line 1" in error.errors[1].reason


def test_every_problem_is_reported_at_once() -> None:
    rows = [line("a"), line("b", url="/x"), line("c"), line("d", body=body(stream=True)), line("a")]
    error = problems(jsonl(*rows))
    text = str(error)
    assert text.startswith("3 problems found:")
    assert "line 2: url:" in text
    assert "line 4: body.stream: streaming is not supported for batch jobs" in text
    assert "line 5: custom_id: duplicate" in text


def test_details_stop_at_twenty_but_every_problem_is_counted() -> None:
    rows = [line(f"r{n}", method="GET") for n in range(1, 31)]
    error = problems(jsonl(*rows))
    assert error.total == 30 and len(error.errors) == 20
    assert [e.line for e in error.errors] == list(range(1, 21))
    assert str(error).startswith("30 problems found, first 20 shown:")
    assert str(error).endswith("... and 10 more")


# --- normalize_requests ---------------------------------------------------------------------


def test_plain_bodies_get_ids_and_a_default_model_on_a_copy() -> None:
    without_model = {"messages": [{"role": "user", "content": "plain"}]}
    with_model = body("explicit")
    items = normalize_requests([without_model, with_model], LIMITS, default_model="kimi-k2-5")
    assert [(i.line, i.custom_id) for i in items] == [(1, "request-1"), (2, "request-2")]
    assert "model" not in without_model  # caller's dict untouched
    assert items[0].request.body == {**without_model, "model": "kimi-k2-5"}
    assert items[0].request.body is not without_model
    assert items[1].request.body is with_model


def test_batch_lines_and_plain_bodies_mix() -> None:
    items = normalize_requests(
        [line("first"), body("second"), line("third")], LIMITS, default_model="kimi-k2-5"
    )
    assert [i.custom_id for i in items] == ["first", "request-2", "third"]


def test_batch_lines_are_not_given_a_default_model() -> None:
    row = line("a", body={"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(ValidationError) as info:
        normalize_requests([row], LIMITS, default_model="kimi-k2-5")
    assert str(info.value) == "request 1: body.model: missing (the model id, a non-empty string)"


def test_normalize_errors_say_request_and_are_collected() -> None:
    requests: list[object] = [
        body(),
        body(max_tokens=0),
        "not a body",
        {"model": "kimi-k2-5", "messages": []},
        line("request-1"),
    ]
    with pytest.raises(BatchValidationError) as info:
        normalize_requests(requests, LIMITS, default_model="kimi-k2-5")
    error = info.value
    assert [e.line for e in error.errors] == [2, 3, 4, 5]
    text = str(error)
    assert "request 2: body.max_tokens: must be an integer >= 1, got 0" in text
    assert "request 3: body: must be a JSON object, got string" in text
    assert "request 4: body.messages: must contain at least one message" in text
    assert "request 5: custom_id: duplicate custom_id 'request-1' (first used on request 1)" in text


def test_unknown_default_model_is_reported() -> None:
    with pytest.raises(
        ValidationError,
        match=re.escape("request 1: body.model: model 'nope' is served by no attachment"),
    ):
        normalize_requests(
            [{"messages": [{"role": "user", "content": "x"}]}], LIMITS, default_model="nope"
        )


def test_a_single_mapping_is_not_mistaken_for_many_requests() -> None:
    with pytest.raises(ValidationError, match="got a single dict"):
        normalize_requests(body(), LIMITS, default_model="kimi-k2-5")


def test_no_requests_give_no_items() -> None:
    assert normalize_requests(iter([]), LIMITS, default_model="kimi-k2-5") == []


# --- output ---------------------------------------------------------------------------------


def test_output_line_for_a_success() -> None:
    response = {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3}}
    out = output_line(
        job_id="job-7",
        custom_id="r1",
        status_code=200,
        response_body=response,
        request_id="chatcmpl-1",
        error_code=None,
        error_message=None,
    )
    assert out == {
        "id": "job-7",
        "custom_id": "r1",
        "response": {"status_code": 200, "request_id": "chatcmpl-1", "body": response},
        "error": None,
    }


def test_output_line_for_a_failure_with_and_without_a_response() -> None:
    failed = output_line(
        job_id="job-8",
        custom_id="r2",
        status_code=None,
        response_body=None,
        request_id=None,
        error_code="cancelled",
        error_message="job cancelled",
    )
    assert failed["response"] is None
    assert failed["error"] == {"code": "cancelled", "message": "job cancelled"}
    last_error = {"error": {"code": 400, "message": "bad"}}
    refused = output_line(
        job_id="job-9",
        custom_id="r3",
        status_code=400,
        response_body=last_error,
        request_id="req-9",
        error_code="invalid_request",
        error_message="bad",
    )
    assert refused["response"] == {"status_code": 400, "request_id": "req-9", "body": last_error}
    assert refused["error"]["code"] == "invalid_request"


def test_write_output_writes_compact_json_lines_and_counts_them() -> None:
    lines = [
        output_line(
            job_id=f"job-{n}",
            custom_id=f"r{n}",
            status_code=200,
            response_body={"text": "天気 ok"},
            request_id=None,
            error_code=None,
            error_message=None,
        )
        for n in range(3)
    ]
    stream = io.StringIO()
    assert write_output(iter(lines), stream) == 3
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 3
    assert ", " not in text and ": " not in text
    assert "天気" in text
    assert [json.loads(row) for row in text.splitlines()] == lines
    assert write_output([], io.StringIO()) == 0


# --- fuzzing --------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_items_or_a_validation_error(data: bytes) -> None:
    try:
        items = read(data)
    except ValidationError as exc:
        assert str(exc)
    else:
        assert all(isinstance(i, BatchItem) for i in items)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=15,
)
good_rows = st.builds(
    lambda n, text: json.dumps(line(f"id{n}", body=body(text))).encode(),
    st.integers(0, 5),
    st.text(max_size=20),
)
fragments = st.one_of(
    good_rows,
    good_rows.map(lambda raw: raw[: len(raw) // 2]),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"[" * 100, b'{"custom_id": "\\ud800"}', b"\xef\xbb\xbf{}"]),
)


@FUZZ
@given(st.lists(fragments, max_size=8))
def test_mixed_good_and_broken_lines_give_items_or_a_validation_error(rows: list[bytes]) -> None:
    data = b"\n".join(rows)
    try:
        items = read(data)
    except ValidationError as exc:
        assert str(exc)
    else:
        ids = [i.custom_id for i in items]
        assert len(ids) == len(set(ids))
        data = data.removeprefix(b"\xef\xbb\xbf")
        assert len(items) == sum(1 for physical in data.split(b"\n") if physical.strip())
