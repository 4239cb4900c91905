"""Whether a decoded JSON value can be stored in a Postgres JSONB column, and how to name it.

:func:`json_problem` finds what JSON or JSONB cannot hold (NUL characters, unpaired
surrogates, non-finite numbers, integers too large to print, non-string object keys,
nesting deeper than :data:`MAX_JSON_DEPTH`) and names the offending field;
:func:`json_too_deep` measures nesting in raw JSON text before anything parses it. The
small helpers :func:`json_kind`, :func:`show_value`, :func:`child_field`, :func:`is_int` and
:func:`is_number` describe user values and where they are in validation messages.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any, NamedTuple

#: Deepest nesting of JSON objects and arrays accepted anywhere in a request.
MAX_JSON_DEPTH = 64
_SHOW_CHARS = 40
# Python refuses to print integers over 4300 digits (about 14,284 bits) by default.
_MAX_INT_BITS = 14_000

# A JSON string, or an unterminated one running to the end of the text; matched in one
# left-to-right pass, so the depth scan stays linear even on adversarial input.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKETS = b"[]{}"
_BRACKET_STEPS = bytes.maketrans(_BRACKETS, b"\x01\xff\x01\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_SCREEN = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


class JsonProblem(NamedTuple):
    """Why a value cannot be stored, and the dotted path of the field (``None``: the whole)."""

    reason: str
    field: str | None


def json_kind(value: object) -> str:
    """The JSON name of a value's type (``string``, ``object``...) for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def show_value(value: object) -> str:
    """A short rendering of a user value for a message (never the whole of a huge string)."""
    if isinstance(value, str):
        if len(value) > _SHOW_CHARS:
            return repr(value[:_SHOW_CHARS]) + f"... ({len(value)} characters)"
        return repr(value)
    small_int = isinstance(value, int) and abs(value) < 10**_SHOW_CHARS
    if value is None or small_int or isinstance(value, float):
        return repr(value)
    return json_kind(value)


def is_int(value: object) -> bool:
    """Whether a value is a JSON integer (a Python ``int`` that is not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether a value is a finite JSON number (``bool`` excluded)."""
    # Not math.isfinite on ints: it overflows on very large ones.
    return math.isfinite(value) if isinstance(value, float) else is_int(value)


def _string_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as JSONB text, or ``None`` when it can."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains an unpaired UTF-16 surrogate, which is not valid Unicode text"
    return None


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``limit``, without parsing it.

    Brackets inside strings are ignored. Linear time and no recursion, so it is safe to
    run before :func:`json.loads` on untrusted input of any depth.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    outside = _JSON_STRING.sub(b"", raw)
    # Openers become +1 and closers -1 (0xff as a signed byte); a running sum is the depth.
    steps = array("b", outside.translate(_BRACKET_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0) > limit


def json_problem(body: dict[str, Any], prefix: str) -> JsonProblem | None:
    """The first value in ``body`` that JSON or a Postgres JSONB column cannot hold, if any.

    One C-speed serialization screens the whole body; only when it finds something is
    the body walked to name the offending field. Fields are dotted paths under ``prefix``.
    """
    try:
        text = _SCREEN.encode(body)
        raw = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        # UnicodeEncodeError (a lone surrogate) is a ValueError too.
        found = _locate_json_problem(body, prefix)
        return found or JsonProblem("is not representable as JSON", prefix or None)
    # A literal backslash before "u0000" also matches; the walk then finds nothing.
    if b"\\u0000" in raw or json_too_deep(raw):
        return _locate_json_problem(body, prefix)
    return None


def _locate_json_problem(root: dict[str, Any], prefix: str) -> JsonProblem | None:
    """Walk the body (iteratively) and return the first value JSONB cannot hold."""
    stack: list[tuple[dict[str, Any] | list[Any], str, int]] = [(root, prefix, 1)]
    while stack:
        container, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return JsonProblem(f"nested more than {MAX_JSON_DEPTH} levels deep", path)
        pairs: Any = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in pairs:
            if isinstance(key, str):
                problem = _string_problem(key)
                if problem is not None:
                    return JsonProblem(f"object key {problem}", path or None)
            elif isinstance(container, dict) and not (
                key is None or isinstance(key, bool) or is_number(key)
            ):
                # json.dumps turns these keys into strings; anything else it refuses.
                return JsonProblem(f"object key {show_value(key)} is not a string", path or None)
            if isinstance(value, str):
                problem = _string_problem(value)
                if problem is not None:
                    return JsonProblem(problem, child_field(path, key))
            elif isinstance(value, dict | list):
                stack.append((value, child_field(path, key), depth + 1))
            elif isinstance(value, float):
                if not math.isfinite(value):
                    return JsonProblem(f"{value!r} is not a JSON number", child_field(path, key))
            elif isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
                return JsonProblem(
                    "integer is too large to serialize as JSON", child_field(path, key)
                )
            elif not (value is None or isinstance(value, bool | int)):
                return JsonProblem(
                    f"a {type(value).__name__} is not a JSON value", child_field(path, key)
                )
    return None


def child_field(path: str, key: object) -> str:
    """The dotted path of ``key`` inside the container at ``path``, for an error message.

    A long key is cut short and control characters are escaped, so the path stays short
    and on one line.
    """
    if isinstance(key, int):
        return f"{path}[{key}]"
    name = str(key)
    if len(name) > _SHOW_CHARS:
        name = name[:_SHOW_CHARS] + "..."
    if not name.isprintable():
        name = repr(name)[1:-1]
    return f"{path}.{name}" if path else name
