"""Bad input through the API and the CLI: a clear error, nothing stored, bounded memory.

Every refusal here also checks the database: a refused submission leaves no batch and no
job row behind. The rule-by-rule message tables live in tests/unit (test_validation.py,
test_batchfile.py, test_bad_input.py); this file proves the same errors reach the user
through api.* and ``python -m jobs`` with nothing half-queued.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from jobs import api, intake
from jobs.batchfile import MAX_LINE_BYTES, iter_batch_stream
from jobs.db import session_scope
from jobs.models import Batch, Job, Priority
from jobs.settings import Settings
from jobs.validation import BatchValidationError, ValidationError
from tests.support import LIMITS, body, jsonl, line, run_cli, run_python, settings_env

pytestmark = pytest.mark.integration

MB = 1024 * 1024
OUT_OF_RANGE = 2**63  # one past the largest bigint id


def rows_stored(settings: Settings) -> tuple[int, int]:
    """(batches, jobs) in the database."""
    assert settings.database_url
    with session_scope(settings.database_url) as s:
        batches = s.execute(select(func.count()).select_from(Batch)).scalar_one()
        jobs = s.execute(select(func.count()).select_from(Job)).scalar_one()
        return batches, jobs


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather"}}

# (case, file content, the exact error message)
BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "file is empty"),
    ("only-blank-lines", b"\n  \r\n\n", "file is empty"),
    (
        "non-utf8",
        jsonl(line("a")) + b'{"custom_id": "caf\xe9"}\n',
        "line 2: not valid UTF-8 at byte 19",
    ),
    (
        "not-an-object",
        jsonl(line("a"), ["custom_id", "b"]),
        "line 2: expected a JSON object with custom_id, method, url and body, got list",
    ),
    (
        "nested-10000-deep",
        jsonl(line("a")) + b'{"custom_id": "b", "body": ' + deep_object(10_000) + b"}\n",
        "line 2: JSON nested more than 64 levels deep",
    ),
    (
        "wrong-url",
        jsonl(line("a", url="/v1/embeddings")),
        "line 1: url: only /v1/chat/completions is supported, got '/v1/embeddings'",
    ),
    ("wrong-method", jsonl(line("a", method="PUT")), "line 1: method: must be 'POST', got 'PUT'"),
    (
        "missing-body",
        jsonl({k: v for k, v in line("a").items() if k != "body"}),
        "line 1: body: missing (the chat-completion request)",
    ),
    (
        "missing-model",
        jsonl(line("a", body={"messages": [{"role": "user", "content": "x"}]})),
        "line 1: body.model: missing (the model id, a non-empty string)",
    ),
    (
        "missing-messages",
        jsonl(line("a", body={"model": "kimi-k2-5"})),
        "line 1: body.messages: missing (a non-empty list of messages is required)",
    ),
    (
        "unknown-role",
        jsonl(
            line("a", body={"model": "kimi-k2-5", "messages": [{"role": "bot", "content": "x"}]})
        ),
        "line 1: body.messages[0].role: unknown role 'bot' "
        "(expected one of assistant, developer, system, tool, user)",
    ),
    (
        "content-wrong-type",
        jsonl(line("a", body={"model": "kimi-k2-5", "messages": [{"role": "user", "content": 7}]})),
        "line 1: body.messages[0].content: must be a string or a list of content parts, "
        "got integer",
    ),
    (
        "tool-schema-not-json-schema",
        jsonl(
            line(
                "a",
                body=body(
                    tools=[
                        {
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "parameters": {"type": "object", "properties": {"city": "string"}},
                            },
                        }
                    ]
                ),
            )
        ),
        "line 1: body.tools[0].function.parameters.properties.city: "
        "a property's schema must be a JSON Schema object, got 'string'",
    ),
    (
        "tool-parameters-not-object",
        jsonl(
            line(
                "a",
                body=body(tools=[{**WEATHER_TOOL, "function": {"name": "f", "parameters": []}}]),
            )
        ),
        "line 1: body.tools[0].function.parameters: "
        'must be a JSON Schema object with "type": "object", got list',
    ),
    (
        "max-tokens-negative",
        jsonl(line("a", body=body(max_tokens=-1))),
        "line 1: body.max_tokens: must be an integer >= 1, got -1",
    ),
    (
        "max-tokens-zero",
        jsonl(line("a", body=body(max_tokens=0))),
        "line 1: body.max_tokens: must be an integer >= 1, got 0",
    ),
    (
        "max-tokens-over-context",
        jsonl(line("a", body=body(max_tokens=262_144))),
        "line 1: body.max_tokens: the prompt (about 31 tokens, estimated) plus max_tokens "
        "262144 exceeds the model's 262144-token context",
    ),
    ("custom-id-empty", jsonl(line("")), "line 1: custom_id: must not be empty"),
    (
        "custom-id-10kb",
        jsonl(line("k" * 10_240)),
        "line 1: custom_id: is 10240 characters long (at most 512)",
    ),
    (
        "custom-id-duplicated",
        jsonl(line("a"), line("b"), line("a")),
        "line 3: custom_id: duplicate custom_id 'a' (first used on line 1)",
    ),
    (
        "unknown-model",
        jsonl(line("a", body={**body(), "model": "llama-9"})),
        "line 1: body.model: model 'llama-9' is served by no attachment (served: kimi-k2-5); to "
        "use it, attach one that serves it to INFERENCE_POOL, or set INFERENCE_MODEL_ID "
        "to it with its INFERENCE_RPM and INFERENCE_TPM",
    ),
]


@pytest.mark.parametrize(
    ("content", "message"), [pytest.param(c, m, id=name) for name, c, m in BAD_FILES]
)
def test_submit_file_refuses_a_bad_file_whole_and_stores_nothing(
    settings: Settings, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    # Good lines around the bad one: none of them may be stored either.
    path.write_bytes(content + (jsonl(line("good-1"), line("good-2")) if content.strip() else b""))
    with pytest.raises(ValidationError) as info:
        api.submit_file(path, settings=settings)
    assert str(info.value) == message
    assert rows_stored(settings) == (0, 0)


def test_submit_file_refuses_a_line_over_10_mb_and_stores_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "long-line.jsonl"
    with path.open("wb") as fh:
        fh.write(jsonl(line("a")))
        fh.write(b'{"custom_id": "big", "pad": "' + b"p" * MAX_LINE_BYTES + b'"}\n')
        fh.write(jsonl(line("c")))
    with pytest.raises(BatchValidationError) as info:
        api.submit_file(path, settings=settings)
    assert str(info.value) == f"line 2: too long: more than {MAX_LINE_BYTES} bytes"
    assert rows_stored(settings) == (0, 0)


# --- submit_batch and enqueue: Python values -------------------------------------------------


def deep_dict(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    return root


def test_submit_batch_refuses_10000_deep_values_and_stores_nothing(settings: Settings) -> None:
    deep_list: Any = []
    for _ in range(10_000):
        deep_list = [deep_list]
    requests: list[object] = [
        line("a"),
        line("b", method=deep_list),
        body(metadata=deep_dict(10_000)),
        "not a request",
    ]
    with pytest.raises(BatchValidationError) as info:
        api.submit_batch(requests, settings=settings)
    text = str(info.value)
    assert text.startswith("3 problems found:\n")
    assert "\n  request 2: method: must be 'POST', got list\n" in text
    assert "\n  request 3: body.metadata.k.k." in text and "nested more than 64 levels" in text
    assert text.endswith("\n  request 4: body: must be a JSON object, got string")
    assert rows_stored(settings) == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"response_format": deep_dict(10_000)},
            "body.response_format.k.k.k",
        ),
        ({"metadata": deep_dict(10_000)}, "metadata.k.k.k"),
        ({"metadata": ["not", "an", "object"]}, "metadata: must be a JSON object, got list"),
        ({"custom_id": "c" * 10_240}, "custom_id: is 10240 characters long (at most 512)"),
        ({"custom_id": ""}, "custom_id: must not be empty"),
        ({"max_tokens": 300_000}, "body.max_tokens: the prompt (about"),
        ({"max_tokens": -1}, "body.max_tokens: must be an integer >= 1, got -1"),
        ({"model": "llama-9"}, "body.model: model 'llama-9' is served by no attachment"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "body.tools[0]"),
    ],
    ids=[
        "body-nested-10000-deep",
        "metadata-nested-10000-deep",
        "metadata-not-object",
        "custom-id-10kb",
        "custom-id-empty",
        "max-tokens-over-context",
        "max-tokens-negative",
        "unknown-model",
        "bad-tool",
    ],
)
def test_enqueue_refuses_a_bad_request_and_stores_nothing(
    settings: Settings, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        api.enqueue([{"role": "user", "content": "hi"}], settings=settings, **kwargs)
    assert str(info.value).startswith(message)
    assert rows_stored(settings) == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "n" * 201}, "name: is 201 characters long (at most 200)"),
        ({"name": ""}, "name: must be a non-empty string, got ''"),
        ({"name": "a\x00b"}, "name: contains a NUL character (\\u0000), which cannot be stored"),
        ({"metadata": {"x": float("nan")}}, "metadata.x: nan is not a JSON number"),
    ],
    ids=["name-too-long", "name-empty", "name-with-nul", "metadata-nan"],
)
def test_submit_refuses_a_bad_name_or_metadata_and_stores_nothing(
    settings: Settings, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        api.submit_batch([line("a")], settings=settings, **kwargs)
    assert str(info.value) == message
    path = tmp_path / "ok.jsonl"
    path.write_bytes(jsonl(line("a")))
    with pytest.raises(ValidationError) as info:
        api.submit_file(path, settings=settings, **kwargs)
    assert str(info.value) == message
    assert rows_stored(settings) == (0, 0)


def test_a_file_name_too_long_for_a_batch_name_is_cut_short(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / ("f" * 240 + ".jsonl")
    path.write_bytes(jsonl(line("a")))
    assert api.submit_file(path, settings=settings).progress().name == "f" * 200


def test_an_unknown_model_is_accepted_once_its_limits_are_configured(settings: Settings) -> None:
    requests = [line("a", body={**body(), "model": "llama-9"})]
    with pytest.raises(ValidationError, match=r"^request 1: body\.model: model 'llama-9'"):
        api.submit_batch(requests, settings=settings)
    assert rows_stored(settings) == (0, 0)
    configured = settings.replace(model_id="llama-9", rpm=10, tpm=50_000)
    batch = api.submit_batch(requests, settings=configured)
    assert batch.progress().total == 1
    assert rows_stored(settings) == (1, 1)


# --- unknown ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_id", [0, -3, OUT_OF_RANGE], ids=["zero", "negative", "2**63"])
def test_a_batch_id_that_cannot_exist_raises_not_found(settings: Settings, batch_id: int) -> None:
    with pytest.raises(api.NotFoundError, match=rf"^batch {batch_id} does not exist$"):
        api.get_batch(batch_id, settings=settings)


@pytest.mark.parametrize("job_id", [0, OUT_OF_RANGE, 10**30], ids=["zero", "2**63", "10**30"])
def test_a_job_id_that_cannot_exist_raises_not_found(settings: Settings, job_id: int) -> None:
    with pytest.raises(api.NotFoundError, match=rf"^job {job_id} does not exist$"):
        api.get_job(job_id, settings=settings)


def test_every_batch_handle_call_on_a_missing_batch_raises_not_found(settings: Settings) -> None:
    handle = api.BatchHandle(424242, api.context(settings))
    for call in (handle.progress, handle.cancel, handle.retry, lambda: list(handle.results())):
        with pytest.raises(api.NotFoundError, match=r"^batch 424242 does not exist$"):
            call()
    job = api.JobHandle(424242, api.context(settings))
    for job_call in (job.status, job.result):
        with pytest.raises(api.NotFoundError, match=r"^job 424242 does not exist$"):
            job_call()


# --- streaming storage: all or nothing, bounded memory ---------------------------------------


def test_a_failure_midway_through_streamed_storage_stores_nothing(settings: Settings) -> None:
    # Eight rows have gone into the COPY when line 9 turns out bad (as when the file
    # changed between the check and the storage pass).
    assert settings.database_url
    data = jsonl(*(line(f"r{n}") for n in range(1, 9)), line("r9", method="GET"))
    stream = iter_batch_stream(io.BytesIO(data), LIMITS)
    with (
        pytest.raises(BatchValidationError, match=r"^line 9: method: must be 'POST', got 'GET'$"),
        session_scope(settings.database_url) as session,
    ):
        intake.create_batch(session, name="half", source="file", items=stream)
    assert rows_stored(settings) == (0, 0)


def test_a_streamed_file_gets_its_count_and_every_line(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_bytes(jsonl(*(line(f"r{n}") for n in range(1, 8))))
    batch = api.submit_file(path, settings=settings)
    progress = batch.progress()
    assert (progress.total, progress.queued) == (7, 7)
    assert settings.database_url
    with session_scope(settings.database_url) as s:
        jobs = s.execute(select(Job).order_by(Job.id)).scalars().all()
        assert [j.custom_id for j in jobs] == [f"r{n}" for n in range(1, 8)]
        first = jobs[0]
        sent = line("r1")["body"]
        assert first.request is not None
        assert first.request["messages"] == sent["messages"]
        assert (first.batch_id, first.model) == (batch.id, sent["model"])
        assert (first.status, first.priority, first.attempts) == ("queued", Priority.BULK, 0)
        assert first.est_prompt_tokens > 0 and first.meta == {}
        assert first.created_at is not None


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    yield path


def feed(path: Path, data: bytes) -> threading.Thread:
    def write() -> None:
        with path.open("wb") as fh:
            fh.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_pipe_is_read_once_and_refused_or_stored_whole(settings: Settings, fifo: Path) -> None:
    writer = feed(fifo, jsonl(line("a"), line("b")) + b"\xff\n")
    with pytest.raises(BatchValidationError, match=r"^line 3: not valid UTF-8 at byte 1$"):
        api.submit_file(fifo, settings=settings)
    writer.join(10)
    assert rows_stored(settings) == (0, 0)
    writer = feed(fifo, jsonl(line("a"), line("b")))
    assert api.submit_file(fifo, settings=settings).progress().total == 2
    writer.join(10)


# Runs in a child process so that its peak memory is this submission's alone.
_SUBMIT_PEAK = textwrap.dedent(
    """
    import json, sys
    from sqlalchemy import text
    from jobs import api
    from jobs.db import session_scope
    from jobs.validation import ValidationError

    ctx = api.context()
    with session_scope(ctx.database_url) as session:
        session.execute(text("SELECT count(*) FROM jobs"))
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
    result = {"error": None, "batch": None}
    try:
        result["batch"] = api.submit_file(sys.argv[1]).id
    except ValidationError as exc:
        result["error"] = str(exc)
    peak = status_kb("VmHWM:")
    result["peak_mb"] = (peak - base) / 1024
    print(json.dumps(result))
    """
)


def submit_in_child(settings: Settings, path: Path) -> dict[str, Any]:
    done = run_python(settings, "-c", _SUBMIT_PEAK, str(path), timeout=110)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def write_file(path: Path, size: int, text_bytes: int) -> int:
    """Write valid lines until ``size`` bytes; return how many lines."""
    count = 0
    written = 0
    filler = ("All work and no play. " * (text_bytes // 22 + 1))[:text_bytes]
    with path.open("wb") as fh:
        while written < size:
            count += 1
            row = line(f"req-{count}", body=body(f"{count} {filler}", max_tokens=64))
            data = json.dumps(row).encode() + b"\n"
            fh.write(data)
            written += len(data)
    return count


def test_a_200_mb_file_with_a_bad_line_near_the_end_is_refused_in_bounded_memory(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "big-bad.jsonl"
    count = write_file(path, 200 * MB, text_bytes=200)
    with path.open("ab") as fh:
        fh.write(jsonl(line("req-1"), line("last")))
    assert path.stat().st_size > 200 * MB
    result = submit_in_child(settings, path)
    path.unlink()  # pytest keeps the last runs' tmp_path: do not leave 200 MB behind
    assert result["error"] == (
        f"line {count + 1}: custom_id: duplicate custom_id 'req-1' (first used on line 1)"
    )
    # The valid lines before it parse into over 1 GB of Python objects if kept.
    assert result["peak_mb"] < 300, result
    assert rows_stored(settings) == (0, 0)


def test_a_200_mb_file_is_stored_in_bounded_memory(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "big-good.jsonl"
    count = write_file(path, 200 * MB, text_bytes=100_000)
    result = submit_in_child(settings, path)
    path.unlink()
    assert result["error"] is None, result["error"]
    # Holding the requests, or one INSERT of them all, costs at least the file's 200 MB;
    # streamed through COPY, one buffer of rows is in memory at a time.
    assert result["peak_mb"] < 150, result
    assert api.get_batch(result["batch"], settings=settings).progress().total == count
    assert rows_stored(settings) == (1, count)


# --- the CLI ---------------------------------------------------------------------------------


def assert_one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"batch-infer: error: {message}\n"
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (jsonl(line("a")) + b"\xc3\x28\n", "line 2: not valid UTF-8 at byte 1"),
        (
            jsonl(line("a"), line("a")),
            "line 2: custom_id: duplicate custom_id 'a' (first used on line 1)",
        ),
    ],
    ids=["empty", "non-utf8", "duplicate-custom-id"],
)
def test_cli_submit_of_a_bad_file_prints_one_line_exits_2_and_stores_nothing(
    settings: Settings, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert_one_line_error(run_cli(settings, "submit", str(path)), message)
    assert rows_stored(settings) == (0, 0)


def test_cli_submit_names_the_variables_for_an_unknown_model(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "llama.jsonl"
    path.write_bytes(jsonl(line("a", body={**body(), "model": "llama-9"})))
    proc = run_cli(settings, "submit", str(path))
    assert_one_line_error(
        proc,
        "line 1: body.model: model 'llama-9' is served by no attachment (served: kimi-k2-5); to "
        "use it, attach one that serves it to INFERENCE_POOL, or set INFERENCE_MODEL_ID "
        "to it with its INFERENCE_RPM and INFERENCE_TPM",
    )
    env = settings_env(settings) | {"INFERENCE_MODEL_ID": "llama-9"}
    del env["INFERENCE_RPM"], env["INFERENCE_TPM"]
    assert_one_line_error(
        run_cli(settings, "submit", str(path), env=env),
        "INFERENCE_MODEL_ID='llama-9' has no known rate limits; "
        "set INFERENCE_RPM and INFERENCE_TPM for it",
    )
    assert rows_stored(settings) == (0, 0)
    env |= {"INFERENCE_RPM": "10", "INFERENCE_TPM": "50000"}
    proc = run_cli(settings, "submit", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"batch \d+ submitted: 1 jobs\n", proc.stdout)
    assert rows_stored(settings) == (1, 1)


@pytest.mark.parametrize(
    ("command", "batch_id"),
    [
        ("cancel", "424242"),
        ("retry", "424242"),
        ("status", str(OUT_OF_RANGE)),
        ("results", str(OUT_OF_RANGE)),
    ],
    ids=["cancel-missing", "retry-missing", "status-2**63", "results-2**63"],
)
def test_cli_on_a_batch_that_does_not_exist_prints_one_line_and_exits_2(
    settings: Settings, command: str, batch_id: str
) -> None:
    assert_one_line_error(run_cli(settings, command, batch_id), f"batch {batch_id} does not exist")
