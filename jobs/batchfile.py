"""OpenAI Batch files: read and validate input lines, build and write output lines.

Input is JSONL, one ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body"}`` object per line. A file is validated whole before anything is queued: every
problem is collected (the first :data:`MAX_REPORTED_ERRORS` in detail, the rest counted)
and raised as one :class:`~jobs.validation.BatchValidationError`, so a user fixes the file
in one round instead of one error at a time.

Reading is streamed in binary and bounded: a line is read with ``readline(MAX_LINE_BYTES
+ 2)`` so an oversized line is detected without being loaded (the rest of it is skipped a
megabyte at a time), nesting depth is measured by a linear scan before :func:`json.loads`
ever recurses, and raw lines are dropped as soon as they are parsed. A file is read twice:
:func:`check_batch_stream` validates it whole keeping nothing but its custom_ids, then
:func:`iter_batch_stream` yields the checked requests one at a time for storage, so neither
a refused nor an accepted file is ever held in memory whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, TextIO

from jobs.jsoncheck import MAX_JSON_DEPTH, json_kind, json_too_deep, show_value
from jobs.validation import (
    MAX_REPORTED_ERRORS,
    BatchValidationError,
    CheckedRequest,
    RequestLimits,
    ValidationError,
    check_request,
)

__all__ = [
    "MAX_CUSTOM_ID_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_LINE_BYTES",
    "BatchItem",
    "check_batch_stream",
    "check_custom_id",
    "iter_batch_stream",
    "normalize_requests",
    "output_line",
    "read_batch_file",
    "read_batch_stream",
    "write_output",
]

#: Longest accepted input line, in bytes, not counting its final newline (LF or CRLF).
MAX_LINE_BYTES = 10 * 1024 * 1024
#: Longest accepted ``custom_id``, in characters: the width of the ``jobs.custom_id``
#: column. OpenAI's Batch format documents no limit; 512 is ample for an id.
MAX_CUSTOM_ID_CHARS = 512
#: The only method and endpoint a batch line may target.
BATCH_METHOD = "POST"
BATCH_URL = "/v1/chat/completions"

_SKIP_CHUNK = 1024 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class BatchItem:
    """One valid request of a batch: where it came from, its id, the checked request."""

    line: int
    custom_id: str
    request: CheckedRequest


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is too large")
    return value


def _parse_line(raw: bytes) -> object:
    """Decode and parse one line; raise ValidationError (without a line number) if it is bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"not valid UTF-8 at byte {exc.start + 1}") from None
    if json_too_deep(raw):
        raise ValidationError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:
        # Also raised for integers longer than Python's int conversion limit.
        raise ValidationError(f"not valid JSON: {str(exc)[:200]}") from None


def check_custom_id(value: object) -> str:
    """Return ``value`` if it is a usable custom_id; raise ValidationError naming ``custom_id``."""
    if not isinstance(value, str):
        what = "missing" if value is None else f"must be a string, got {json_kind(value)}"
        raise ValidationError(what, field="custom_id")
    if not value:
        raise ValidationError("must not be empty", field="custom_id")
    if len(value) > MAX_CUSTOM_ID_CHARS:
        raise ValidationError(
            f"is {len(value)} characters long (at most {MAX_CUSTOM_ID_CHARS})", field="custom_id"
        )
    if "\x00" in value:
        raise ValidationError("must not contain a NUL character", field="custom_id")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(
                "contains an unpaired UTF-16 surrogate, which is not valid Unicode text",
                field="custom_id",
            ) from None
    return value


def _check_batch_line(
    obj: object, limits: RequestLimits, collected: _Collector, number: int
) -> tuple[str, CheckedRequest]:
    """Validate one OpenAI Batch input line; return its custom_id and checked body.

    The custom_id is claimed before the rest is checked, so a duplicate is reported even
    when one of the two lines is also wrong in some other way.
    """
    if not isinstance(obj, dict):
        raise ValidationError(
            f"expected a JSON object with custom_id, method, url and body, got {json_kind(obj)}"
        )
    custom_id = check_custom_id(obj.get("custom_id"))
    collected.claim(custom_id, number)
    method = obj.get("method")
    if method != BATCH_METHOD:
        raise ValidationError(f"must be {BATCH_METHOD!r}, got {show_value(method)}", field="method")
    url = obj.get("url")
    if url != BATCH_URL:
        raise ValidationError(f"only {BATCH_URL} is supported, got {show_value(url)}", field="url")
    if "body" not in obj:
        raise ValidationError("missing (the chat-completion request)", field="body")
    return custom_id, check_request(obj["body"], limits, field_prefix="body")


class _Collector:
    """Valid items, claimed custom_ids and problems, accumulated across one batch.

    Once a problem is found the batch is going to be refused, so valid items are no
    longer kept. With ``fail_fast`` the first problem is raised at once.
    """

    def __init__(self, label: str, *, fail_fast: bool = False) -> None:
        self.label = label
        self.fail_fast = fail_fast
        self.items: list[BatchItem] = []
        self.errors: list[ValidationError] = []
        self.total = 0
        self._seen: dict[str, int] = {}

    def claim(self, custom_id: str, number: int) -> None:
        first = self._seen.setdefault(custom_id, number)
        if first != number:
            raise ValidationError(
                f"duplicate custom_id {show_value(custom_id)} (first used on {self.label} {first})",
                field="custom_id",
            )

    def problem(self, error: ValidationError, number: int) -> None:
        self.total += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error.at(number, self.label))
        self.items.clear()
        if self.fail_fast:
            raise BatchValidationError(self.errors, total=self.total)

    def keep(self, item: BatchItem) -> None:
        if not self.total:
            self.items.append(item)

    def finish(self) -> list[BatchItem]:
        if self.total:
            raise BatchValidationError(self.errors, total=self.total)
        return self.items


def _skip_rest_of_line(stream: BinaryIO) -> None:
    while True:
        chunk = stream.readline(_SKIP_CHUNK)
        if not chunk or chunk.endswith(b"\n"):
            return


def _content_bytes(raw: bytes) -> int:
    """Length of a line read from a file, without its final LF or CRLF."""
    if raw.endswith(b"\r\n"):
        return len(raw) - 2
    return len(raw) - 1 if raw.endswith(b"\n") else len(raw)


def _scan(stream: BinaryIO, limits: RequestLimits, collected: _Collector) -> Iterator[BatchItem]:
    """Yield every valid request of a batch stream; problems go to ``collected``.

    At most ``MAX_LINE_BYTES + 2`` bytes of a line are ever read at once.
    """
    number = 0
    any_line = False
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 2)
        if not raw:
            break
        number += 1
        if _content_bytes(raw) > MAX_LINE_BYTES:
            if not raw.endswith(b"\n"):
                _skip_rest_of_line(stream)
            any_line = True
            collected.problem(
                ValidationError(f"too long: more than {MAX_LINE_BYTES} bytes"), number
            )
            continue
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        if not raw.strip():
            continue
        any_line = True
        try:
            custom_id, request = _check_batch_line(_parse_line(raw), limits, collected, number)
        except ValidationError as exc:
            collected.problem(exc, number)
            continue
        yield BatchItem(line=number, custom_id=custom_id, request=request)
    if not any_line:
        raise ValidationError("file is empty")


def check_batch_stream(stream: BinaryIO, limits: RequestLimits) -> int:
    """Validate a whole OpenAI Batch JSONL stream (binary); return how many requests it holds.

    Nothing but the custom_ids is kept, so memory does not grow with the requests. Raises
    like :func:`read_batch_stream`.
    """
    collected = _Collector("line")
    count = sum(1 for _ in _scan(stream, limits, collected))
    collected.finish()
    return count


def iter_batch_stream(stream: BinaryIO, limits: RequestLimits) -> Iterator[BatchItem]:
    """Yield the checked requests of a stream one at a time, for storing them as they come.

    Meant for a stream that :func:`check_batch_stream` accepted: a problem (the file changed
    in between) raises :class:`BatchValidationError` at once, so a caller storing the items
    in one transaction rolls it back and stores nothing.
    """
    yield from _scan(stream, limits, _Collector("line", fail_fast=True))


def read_batch_stream(stream: BinaryIO, limits: RequestLimits) -> list[BatchItem]:
    """Read and validate a whole OpenAI Batch JSONL stream (binary); return its items.

    Blank lines are skipped. Raises ``ValidationError("file is empty")`` when there is no
    line at all, and one :class:`BatchValidationError` listing every bad line otherwise.
    Byte offsets in UTF-8 errors are 1-based, like line numbers. A seekable stream is
    validated first (:func:`check_batch_stream`) and read again only when it is good, so a
    refused file costs no more memory than its custom_ids.
    """
    if stream.seekable():
        start = stream.tell()
        check_batch_stream(stream, limits)
        stream.seek(start)
        return list(iter_batch_stream(stream, limits))
    collected = _Collector("line")
    for item in _scan(stream, limits, collected):
        collected.keep(item)
    return collected.finish()


def read_batch_file(path: str | os.PathLike[str], limits: RequestLimits) -> list[BatchItem]:
    """Read and validate an OpenAI Batch JSONL file; see :func:`read_batch_stream`."""
    with open(path, "rb") as stream:
        return read_batch_stream(stream, limits)


def _is_batch_line(obj: Mapping[str, Any]) -> bool:
    if "body" in obj or "url" in obj or "method" in obj:
        return True
    return "custom_id" in obj and "messages" not in obj


def normalize_requests(
    requests: Iterable[object], limits: RequestLimits, *, default_model: str
) -> list[BatchItem]:
    """Validate a mix of plain request bodies and OpenAI Batch input lines.

    A plain body gets the custom_id ``request-<n>`` (its 1-based position) and, when it
    names no model, ``default_model`` (on a copy; the caller's dict is left alone). A
    batch line is checked exactly as in a file. Errors say ``request <n>``; all of them
    are raised together as one :class:`BatchValidationError`.
    """
    if isinstance(requests, Mapping | str | bytes):
        raise ValidationError(
            "expected an iterable of requests (request bodies or batch lines), "
            f"got a single {type(requests).__name__}"
        )
    collected = _Collector("request")
    for number, obj in enumerate(requests, start=1):
        try:
            if isinstance(obj, dict) and _is_batch_line(obj):
                custom_id, request = _check_batch_line(obj, limits, collected, number)
            else:
                custom_id = f"request-{number}"
                collected.claim(custom_id, number)
                body = obj
                if isinstance(body, dict) and body.get("model") is None:
                    body = {**body, "model": default_model}
                request = check_request(body, limits, field_prefix="body")
        except ValidationError as exc:
            collected.problem(exc, number)
            continue
        collected.keep(BatchItem(line=number, custom_id=custom_id, request=request))
    return collected.finish()


def output_line(
    *,
    job_id: str,
    custom_id: str,
    status_code: int | None,
    response_body: dict[str, Any] | None,
    request_id: str | None,
    error_code: str | None,
    error_message: str | None,
) -> dict[str, Any]:
    """One OpenAI Batch output line.

    ``response`` is null when there is no status code (the request never got an HTTP
    answer worth keeping); ``error`` is null when neither a code nor a message is given.
    """
    response = (
        None
        if status_code is None
        else {"status_code": status_code, "request_id": request_id, "body": response_body}
    )
    error = (
        None
        if error_code is None and error_message is None
        else {"code": error_code, "message": error_message}
    )
    return {"id": job_id, "custom_id": custom_id, "response": response, "error": error}


def write_output(lines: Iterable[dict[str, Any]], stream: TextIO) -> int:
    """Write output lines as compact JSONL; return how many were written."""
    count = 0
    for line in lines:
        stream.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False))
        stream.write("\n")
        count += 1
    return count
