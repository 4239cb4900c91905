"""Bad input refused with our own error, naming the line or field, in bounded memory.

Complements test_batchfile.py and test_validation.py (which hold the one-rule-per-case
tables) with the edges: line-length boundaries, a 200 MB line, values that Python callers
can pass but no JSON file can hold, the two-pass reader, and fuzzing beyond plain JSON.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.batchfile import (
    MAX_LINE_BYTES,
    check_batch_stream,
    iter_batch_stream,
    normalize_requests,
    read_batch_stream,
)
from jobs.validation import BatchValidationError, ValidationError, check_request
from tests.support import HEROKU_EXAMPLE, LIMITS, ROOT, body, jsonl, line

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MB = 1024 * 1024


def only_problem(data: bytes) -> ValidationError:
    with pytest.raises(BatchValidationError) as info:
        read_batch_stream(io.BytesIO(data), LIMITS)
    assert info.value.total == 1, str(info.value)
    return info.value.errors[0]


def refuse_requests(requests: list[object]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        normalize_requests(requests, LIMITS, default_model="kimi-k2-5")
    return info.value


def deep_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# --- line length: where the 10 MB limit falls ------------------------------------------------


def exactly(content_bytes: int) -> bytes:
    """A valid batch line of exactly ``content_bytes`` bytes, without its newline."""
    row = json.dumps(line("big", body=body("")))
    pad = content_bytes - len(row)
    return row.replace('"content": ""', '"content": "' + "z" * pad + '"').encode()


# LF at exactly the limit: test_batchfile.py::test_a_line_exactly_at_the_limit_is_parsed.
@pytest.mark.parametrize("ending", [b"\r\n", b""], ids=["crlf", "eof"])
def test_a_line_of_exactly_10_mb_is_read_with_crlf_or_at_end_of_file(ending: bytes) -> None:
    raw = exactly(MAX_LINE_BYTES)
    assert len(raw) == MAX_LINE_BYTES
    error = only_problem(raw + ending)
    # Parsed: refused for its tokens, not its bytes.
    assert (error.line, error.field) == (1, "body.messages")
    assert "context" in error.reason


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""], ids=["lf", "crlf", "eof"])
def test_a_line_one_byte_over_10_mb_is_too_long_and_the_next_line_is_read(ending: bytes) -> None:
    data = b"x" * (MAX_LINE_BYTES + 1) + ending
    if ending:
        data += jsonl(line("after", method="GET"))
    with pytest.raises(BatchValidationError) as info:
        read_batch_stream(io.BytesIO(data), LIMITS)
    assert [str(e) for e in info.value.errors] == [
        f"line 1: too long: more than {MAX_LINE_BYTES} bytes",
        *(["line 2: method: must be 'POST', got 'GET'"] if ending else []),
    ]


# Runs in a child process so that its peak memory is this read's alone.
_READ_PEAK = textwrap.dedent(
    """
    import json, sys
    from jobs.batchfile import read_batch_file
    from jobs.validation import RequestLimits, ValidationError

    LIMITS = RequestLimits(context_tokens=262_144, tpm=800_000, default_max_tokens=4096)

    # ru_maxrss would carry over the parent's peak across fork and exec; VmHWM is this
    # process's own peak, restarted from the current size where the kernel allows.
    def status_kb(key):
        with open("/proc/self/status") as status:
            return next(int(row.split()[1]) for row in status if row.startswith(key))

    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # then VmHWM may include the imports' peak: an over-estimate
    base = status_kb("VmRSS:")
    try:
        read_batch_file(sys.argv[1], LIMITS)
        error = None
    except ValidationError as exc:
        error = str(exc)
    peak = status_kb("VmHWM:")
    print(json.dumps({"error": error, "peak_mb": (peak - base) / 1024}))
    """
)


def test_a_200_mb_line_is_refused_without_loading_it(tmp_path: Path) -> None:
    path = tmp_path / "one-huge-line.jsonl"
    with path.open("wb") as fh:
        fh.write(jsonl(line("a")))
        fh.write(b'{"custom_id": "huge", "pad": "')
        for _ in range(200):
            fh.write(b"y" * MB)
        fh.write(b'"}\n')
        fh.write(jsonl(line("b", url="/v1/embeddings")))
    done = subprocess.run(
        [sys.executable, "-c", _READ_PEAK, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    path.unlink()  # pytest keeps the last runs' tmp_path: do not leave 200 MB behind
    result = json.loads(done.stdout)
    assert result["error"] == (
        "2 problems found:\n"
        f"  line 2: too long: more than {MAX_LINE_BYTES} bytes\n"
        "  line 3: url: only /v1/chat/completions is supported, got '/v1/embeddings'"
    )
    # One 10 MB read plus 1 MB skips; loading the line would cost 200 MB or more.
    assert result["peak_mb"] < 100, result


# --- the two passes over a file --------------------------------------------------------------


def test_check_pass_counts_requests_and_raises_the_same_error_as_reading() -> None:
    good = jsonl(line("a"), line("b")) + b"\n" + jsonl(line("c"))
    assert check_batch_stream(io.BytesIO(good), LIMITS) == 3
    bad = good + jsonl(line("a"), line("d", body=body(max_tokens=0)))
    with pytest.raises(BatchValidationError) as checked:
        check_batch_stream(io.BytesIO(bad), LIMITS)
    with pytest.raises(BatchValidationError) as read:
        read_batch_stream(io.BytesIO(bad), LIMITS)
    assert (
        str(checked.value)
        == str(read.value)
        == (
            "2 problems found:\n"
            "  line 5: custom_id: duplicate custom_id 'a' (first used on line 1)\n"
            "  line 6: body.max_tokens: must be an integer >= 1, got 0"
        )
    )


def test_storage_pass_stops_at_the_first_bad_line() -> None:
    # A file edited between the check and the storage pass: the storage pass must raise
    # before yielding anything past the problem, so its transaction rolls back.
    data = jsonl(line("a"), line("b"), line("c", url="/v1/completions"), line("d"))
    stream = iter_batch_stream(io.BytesIO(data), LIMITS)
    assert [next(stream).custom_id, next(stream).custom_id] == ["a", "b"]
    with pytest.raises(BatchValidationError) as info:
        next(stream)
    assert str(info.value) == (
        "line 3: url: only /v1/chat/completions is supported, got '/v1/completions'"
    )


class _Unseekable(io.RawIOBase):
    """A pipe-like binary stream: readable once, not seekable."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_an_unseekable_stream_is_read_in_one_pass() -> None:
    data = jsonl(line("a"), line("b"))
    stream = io.BufferedReader(_Unseekable(data))
    assert not stream.seekable()
    assert [i.custom_id for i in read_batch_stream(stream, LIMITS)] == ["a", "b"]
    bad = io.BufferedReader(_Unseekable(data + b"\xff\n"))
    with pytest.raises(BatchValidationError, match=r"^line 3: not valid UTF-8 at byte 1$"):
        read_batch_stream(bad, LIMITS)


# --- values a Python caller can pass that no JSON file holds ---------------------------------


@pytest.mark.parametrize("field", ["method", "url"])
def test_a_10000_level_deep_method_or_url_from_python_is_a_validation_error(field: str) -> None:
    row = line("a", **{field: deep_list(10_000)})
    error = refuse_requests([row])
    assert str(error).startswith(f"request 1: {field}: ")
    assert str(error).endswith("got list")


def test_a_10000_level_deep_custom_id_or_body_from_python_is_a_validation_error() -> None:
    deep = deep_list(10_000)
    error = refuse_requests([{**line("a"), "custom_id": deep}, line("b", body=deep)])
    assert isinstance(error, BatchValidationError)
    assert [str(e) for e in error.errors] == [
        "request 1: custom_id: must be a string, got list",
        "request 2: body: must be a JSON object, got list",
    ]


def test_a_10000_level_deep_plain_body_is_a_validation_error() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(10_000):
        node["k"] = {}
        node = node["k"]
    error = refuse_requests([body(tools=deep)])
    assert str(error).startswith("request 1: body.tools.k.k.k")
    assert str(error).endswith("nested more than 64 levels deep")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (10**5000, "integer"),
        (list(range(1_000_000)), "list"),
        ("G" * 10_000, "'GGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGG'... (10000 characters)"),
        (float("nan"), "nan"),
    ],
    ids=["huge-int", "huge-list", "huge-string", "nan"],
)
def test_a_wrong_method_of_any_size_is_shown_short(value: object, shown: str) -> None:
    error = refuse_requests([line("a", method=value)])
    assert str(error) == f"request 1: method: must be 'POST', got {shown}"


def test_control_characters_in_a_key_keep_the_message_on_one_line() -> None:
    with pytest.raises(ValidationError) as info:
        check_request(body(metadata={"a\nb\x1b": "\x00"}), LIMITS)
    assert info.value.field == "body.metadata.a\\nb\\x1b"
    assert "\n" not in str(info.value)


# --- tool schemas ----------------------------------------------------------------------------


def tool_parameters(parameters: object) -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    return body(tools=[tool])


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        (
            {"type": "object", "properties": {"city": "string"}},
            "body.tools[0].function.parameters.properties.city",
            "a property's schema must be a JSON Schema object, got 'string'",
        ),
        (
            {"type": "object", "properties": {"n": ["integer"]}},
            "body.tools[0].function.parameters.properties.n",
            "a property's schema must be a JSON Schema object, got list",
        ),
        (
            {"type": "object", "properties": {}, "required": "city"},
            "body.tools[0].function.parameters.required",
            "must be a list of property names, got 'city'",
        ),
        (
            {"type": "object", "required": [1]},
            "body.tools[0].function.parameters.required",
            "must be a list of property names, got list",
        ),
    ],
    ids=["property-schema-string", "property-schema-list", "required-string", "required-ints"],
)
def test_tool_schema_that_is_not_json_schema_is_refused(
    parameters: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        check_request(tool_parameters(parameters), LIMITS)
    assert str(info.value) == f"{field}: {message}"


def test_boolean_property_schemas_and_the_heroku_example_pass() -> None:
    check_request(tool_parameters({"type": "object", "properties": {"any": True}}), LIMITS)
    check_request(HEROKU_EXAMPLE, LIMITS)


# --- fuzzing ---------------------------------------------------------------------------------

_GOOD_FILE = jsonl(
    line("a"),
    line("b", body=HEROKU_EXAMPLE),
    line("c", body=body("tool", max_tokens=10, stop=["x"])),
)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A good file with a few bytes replaced, inserted or deleted."""
    data = bytearray(_GOOD_FILE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([*b'{}[]":,\\\n\r0-9aetnul ', 0, 0x80, 0xC3, 0xFF]))
        if kind == "replace":
            data[at] = byte
        elif kind == "insert":
            data.insert(at, byte)
        else:
            del data[at]
    return bytes(data)


@FUZZ
@given(mutated_files())
def test_mutated_files_give_the_same_outcome_from_every_reader(data: bytes) -> None:
    readers: list[Callable[[], int]] = [
        lambda: len(read_batch_stream(io.BytesIO(data), LIMITS)),
        lambda: check_batch_stream(io.BytesIO(data), LIMITS),
        lambda: len(read_batch_stream(io.BufferedReader(_Unseekable(data)), LIMITS)),
    ]
    outcomes: list[int | str] = []
    for read in readers:
        try:
            outcomes.append(read())
        except ValidationError as exc:
            assert str(exc)
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1] == outcomes[2]


python_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**4400, max_value=10**4500)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=5)
    | st.sampled_from(["POST", "/v1/chat/completions", "kimi-k2-5", "user", "\x00", "\udc00"])
)
python_values = st.recursive(
    python_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.frozensets(st.integers(), max_size=3)
        | st.dictionaries(
            st.sampled_from(["model", "messages", "role", "content", "max_tokens", "tools"])
            | st.text(max_size=4)
            | st.integers()
            | st.none(),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
batch_rows = st.fixed_dictionaries(
    {},
    optional={
        "custom_id": python_values,
        "method": python_values,
        "url": python_values,
        "body": python_values,
    },
)


@FUZZ
@given(python_values)
def test_python_values_either_pass_or_raise_validation_error(value: object) -> None:
    try:
        checked = check_request(value, LIMITS)
    except ValidationError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert checked.body is value


@FUZZ
@given(st.lists(batch_rows | python_values, max_size=4))
def test_python_batches_either_give_items_or_raise_validation_error(rows: list[object]) -> None:
    try:
        items = normalize_requests(rows, LIMITS, default_model="kimi-k2-5")
    except BatchValidationError as exc:
        for error in exc.errors:
            assert error.line is not None and 1 <= error.line <= len(rows)
            assert str(error).startswith(f"request {error.line}: ")
            assert "\n" not in str(error)
    else:
        assert [i.line for i in items] == list(range(1, len(rows) + 1))
        for item in items:
            # What is accepted can be stored as strict JSON.
            json.dumps(item.request.body, allow_nan=False)
