"""The simulated provider's rules: what it accepts, what a call costs, what it answers.

These pieces live here, kept apart from the HTTP plumbing in :mod:`devstack.simulator`:

* :func:`parse_request` validates a chat-completions body the way the real API would and
  returns a :class:`ChatRequest`, or raises :class:`InvalidRequestError` naming the offending field.
* Token counting is deterministic so that tests and benchmarks can predict it exactly:
  a message costs ``4 + ceil(len(text) / chars_per_token)`` where ``text`` is the content
  string (or the concatenated text parts, or nothing for a null content); the ``tools`` array
  costs ``ceil(len(canonical_json(tools)) / chars_per_token)``.
* :func:`plan_reply` and :func:`completion_body` build the reply deterministically from a
  hash of the canonical body: ``completion_tokens = min(max_tokens or default, 16 + h % 48)``;
  a tool call when tools are given and ``tool_choice`` is ``"required"``, names a function, or
  is ``"auto"`` and the last user message mentions the weather; ``message.reasoning`` when
  ``extended_thinking`` asks for it.
* :class:`SlidingWindow` is the strict sliding-window limiter (requests and tokens per
  ``window_s``), charging at admission, plus the exact "most admitted in any window" figures
  computed from the full admission log.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_CHOICES = frozenset({"none", "auto", "required"})
_FILLER = "the quick brown fox jumps over a lazy dog while simulated tokens keep flowing".split()  # noqa: SIM905
_PLACE = re.compile(r"\bin ([A-Z][\w.-]*(?: [A-Z][\w.-]*)*)")


class InvalidRequestError(Exception):
    """A request the real API would refuse; carries the HTTP status and the offending field."""

    def __init__(
        self,
        message: str,
        param: str | None,
        *,
        status: int = 400,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body for this refusal."""
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a validated chat-completions body the simulator needs."""

    model: str
    max_tokens: int | None
    prompt_tokens: int
    last_user_text: str
    tools: tuple[dict[str, Any], ...]
    tool_choice: str | dict[str, Any]
    include_reasoning: bool
    digest: bytes


def canonical_json(value: object) -> str:
    """Key-sorted, whitespace-free JSON: equal bodies give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def text_tokens(text: str, chars_per_token: float) -> int:
    """Deterministic token count of a piece of text."""
    return math.ceil(len(text) / chars_per_token)


def prompt_tokens_for(body: dict[str, Any], chars_per_token: float) -> int:
    """Prompt tokens the simulator charges for an already valid body."""
    total = sum(
        4 + text_tokens(_content_text(m.get("content")), chars_per_token) for m in body["messages"]
    )
    tools = body.get("tools")
    if tools:
        total += text_tokens(canonical_json(tools), chars_per_token)
    return total


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_content(msg: dict[str, Any], where: str) -> None:
    role = msg["role"]
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise InvalidRequestError(
                f"Only assistant messages may carry tool_calls ({where}).", f"{where}.tool_calls"
            )
        if not isinstance(tool_calls, list) or not tool_calls:
            raise InvalidRequestError(
                f"{where}.tool_calls must be a non-empty array.", f"{where}.tool_calls"
            )
        for j, call in enumerate(tool_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(call, dict)
                or not isinstance(call.get("id"), str)
                or call.get("type") != "function"
                or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments"), str)
            ):
                raise InvalidRequestError(
                    f"{where}.tool_calls[{j}] must be "
                    '{"id": str, "type": "function", "function": {"name": str, "arguments": str}}.',
                    f"{where}.tool_calls[{j}]",
                )
    content = msg.get("content")
    if content is None:
        if role == "assistant" and tool_calls:
            return
        raise InvalidRequestError(
            f"{where}.content may be null only for an assistant message with tool_calls.",
            f"{where}.content",
        )
    if isinstance(content, str):
        return
    if isinstance(content, list) and content:
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise InvalidRequestError(
                    f'{where}.content[{j}] must be {{"type": "text", "text": str}}.',
                    f"{where}.content",
                )
        return
    raise InvalidRequestError(
        f"{where}.content must be a string or a non-empty array of text parts.", f"{where}.content"
    )


def _check_messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "'messages' must be a non-empty array of message objects.", "messages"
        )
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"{where} must be an object.", where)
        if msg.get("role") not in ROLES:
            raise InvalidRequestError(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}.", f"{where}.role"
            )
        _check_content(msg, where)
        if msg["role"] == "tool" and not (
            isinstance(msg.get("tool_call_id"), str) and msg["tool_call_id"]
        ):
            raise InvalidRequestError(
                f"{where} has role 'tool' but no tool_call_id.", f"{where}.tool_call_id"
            )
    return messages


def _check_tools(tools: object) -> tuple[dict[str, Any], ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("'tools' must be a non-empty array when present.", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequestError(f"{where}.type must be 'function'.", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object.", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidRequestError(
                f"{where}.function.name must match ^[A-Za-z0-9_-]{{1,64}}$.",
                f"{where}.function.name",
            )
        if name in names:
            raise InvalidRequestError(
                f"Duplicate function name {name!r} in tools.", f"{where}.function.name"
            )
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not (
            isinstance(params, dict)
            and params.get("type") == "object"
            and isinstance(params.get("properties", {}), dict)
        ):
            raise InvalidRequestError(
                f"{where}.function.parameters must be a JSON Schema with type 'object'.",
                f"{where}.function.parameters",
            )
    return tuple(t["function"] for t in tools)


def _check_tool_choice(choice: object, tools: tuple[dict[str, Any], ...]) -> str | dict[str, Any]:
    if choice is None:
        return "auto" if tools else "none"
    if not tools:
        raise InvalidRequestError(
            "'tool_choice' is only allowed when 'tools' are specified.", "tool_choice"
        )
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and any(t["name"] == name for t in tools):
            return choice
        raise InvalidRequestError(
            "'tool_choice' names a function that is not in 'tools'.", "tool_choice"
        )
    raise InvalidRequestError(
        "'tool_choice' must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
        "tool_choice",
    )


def _check_sampling(body: dict[str, Any]) -> None:
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is not None and not (_is_number(value) and 0 <= value <= high):
            raise InvalidRequestError(f"'{name}' must be a number between 0 and {high:g}.", name)
    thinking = body.get("extended_thinking")
    if thinking is not None and not isinstance(thinking, dict):
        raise InvalidRequestError("'extended_thinking' must be an object.", "extended_thinking")


def parse_request(
    body: object,
    *,
    models: Collection[str],
    chars_per_token: float,
    context_tokens: int,
) -> ChatRequest:
    """Validate a chat-completions body and count its prompt tokens.

    Raises :class:`InvalidRequestError` (400, or 404 ``model_not_found``) for anything the real
    API would refuse; the exception's ``param`` names the field at fault.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("You must provide a model parameter.", "model")
    if model not in models:
        raise InvalidRequestError(
            f"The model `{model[:100]}` does not exist or you do not have access to it.",
            "model",
            status=404,
            code="model_not_found",
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be a boolean.", "stream")
    if stream:
        raise InvalidRequestError(
            "Streaming is not supported by this endpoint; send stream=false.", "stream"
        )
    messages = _check_messages(body.get("messages"))
    # OpenAI's newer name for the same budget is taken first.
    budget_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(budget_name)
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise InvalidRequestError(f"'{budget_name}' must be an integer >= 1.", budget_name)
    tools = _check_tools(body.get("tools"))
    tool_choice = _check_tool_choice(body.get("tool_choice"), tools)
    _check_sampling(body)
    prompt = prompt_tokens_for(body, chars_per_token)
    wanted = prompt + (max_tokens or 0)
    if wanted > context_tokens or prompt >= context_tokens:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_tokens} tokens. However, you "
            f"requested {wanted} tokens ({prompt} in the messages, {max_tokens or 0} in the "
            "completion). Please reduce the length of the messages or completion.",
            "messages",
        )
    thinking = body.get("extended_thinking") or {}
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    return ChatRequest(
        model=model,
        max_tokens=max_tokens,
        prompt_tokens=prompt,
        last_user_text=_content_text(last_user.get("content")) if last_user else "",
        tools=tools,
        tool_choice=tool_choice,
        include_reasoning=thinking.get("enabled") is True
        and thinking.get("include_reasoning") is True,
        digest=hashlib.sha256(canonical_json(body).encode()).digest(),
    )


@dataclass
class ReplyPlan:
    """Shape and size of a reply, decided before admission so its cost is known."""

    completion_tokens: int
    finish_reason: str
    tool: dict[str, Any] | None


def plan_reply(req: ChatRequest, default_max_tokens: int) -> ReplyPlan:
    """Decide the reply's shape and size, deterministically from the body's hash."""
    digest = int.from_bytes(req.digest[:8], "big")
    limit = req.max_tokens or default_max_tokens
    tokens = min(limit, 16 + digest % 48)
    choice = req.tool_choice
    tool: dict[str, Any] | None = None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next(t for t in req.tools if t["name"] == name)
    elif req.tools and (
        choice == "required"
        or (choice == "auto" and re.search(r"\bweather\b", req.last_user_text, re.IGNORECASE))
    ):
        tool = req.tools[0]
    if tool is not None:
        return ReplyPlan(tokens, "tool_calls", tool)
    return ReplyPlan(tokens, "length" if tokens == limit else "stop", None)


def _sample_value(schema: object, text: str) -> object:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    place = _PLACE.search(text)
    return place.group(1) if place else "example"


def _tool_arguments(tool: dict[str, Any], text: str) -> str:
    params = tool.get("parameters") or {}
    props: dict[str, Any] = params.get("properties") or {}
    required = params.get("required")
    wanted = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
    wanted = wanted or list(props)
    return json.dumps({name: _sample_value(props.get(name), text) for name in wanted})


def _filler(prefix: str, chars: int, seed: int) -> str:
    words = itertools.cycle(_FILLER[seed % len(_FILLER) :] + _FILLER[: seed % len(_FILLER)])
    parts = [prefix]
    length = len(prefix)
    while length < chars:
        word = next(words)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:chars]


def completion_body(
    req: ChatRequest, plan: ReplyPlan, chars_per_token: float, number: int
) -> dict[str, Any]:
    """The ``chat.completion`` body for an admitted call; ``number`` makes its id unique."""
    seed = int.from_bytes(req.digest[8:12], "big")
    message: dict[str, Any] = {"role": "assistant"}
    if plan.tool is not None:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": "call_" + req.digest.hex()[:24],
                "type": "function",
                "function": {
                    "name": plan.tool["name"],
                    "arguments": _tool_arguments(plan.tool, req.last_user_text),
                },
            }
        ]
    else:
        chars = max(1, round(plan.completion_tokens * chars_per_token))
        prefix = "Simulated reply to: " + req.last_user_text[:40]
        message["content"] = _filler(prefix, chars, seed)
    if req.include_reasoning:
        message["reasoning"] = _filler("Reasoning about: " + req.last_user_text[:40], 120, seed + 1)
    usage = {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": req.prompt_tokens + plan.completion_tokens,
    }
    return {
        "id": f"chatcmpl-sim-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason}],
        "usage": usage,
    }


def format_reset(seconds: float) -> str:
    """Format a wait like the provider's reset headers: ``"250ms"``, ``"1.5s"``, ``"51s"``."""
    if seconds <= 0:
        return "0s"
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    tenths = math.ceil(round(seconds * 10, 6))
    return f"{tenths // 10}s" if tenths % 10 == 0 else f"{tenths / 10:.1f}s"


@dataclass(frozen=True)
class WindowState:
    """The limiter's verdict on one call and the numbers for the rate-limit headers."""

    admitted: bool
    too_large: bool
    limit_requests: int | None
    remaining_requests: int
    reset_requests: float
    limit_tokens: int | None
    remaining_tokens: int
    reset_tokens: float
    #: Seconds until this call would fit (0 when admitted).
    wait: float
    #: The limiter's ``clock()`` at the verdict: the admission time when admitted.
    at: float = 0.0

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers for the dimensions that have a limit."""
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = format_reset(self.reset_requests)
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens)
        return out


def max_in_window(log: Sequence[tuple[float, int]], window_s: float) -> tuple[int, int]:
    """Most requests and most tokens admitted in any ``window_s``-long sliding window.

    ``log`` holds ``(admitted_at, tokens)`` in admission order. A window ending at ``t`` holds
    the entries with ``admitted_at > t - window_s``, the same rule admission uses, so a limit
    that was respected shows up here as a maximum no larger than the limit.
    """
    best_requests = best_tokens = 0
    left = 0
    tokens = 0
    for right, (at, cost) in enumerate(log):
        tokens += cost
        while log[left][0] <= at - window_s:
            tokens -= log[left][1]
            left += 1
        best_requests = max(best_requests, right - left + 1)
        best_tokens = max(best_tokens, tokens)
    return best_requests, best_tokens


class SlidingWindow:
    """Strict sliding-window limiter on requests and tokens, charging at admission.

    A call is admitted iff the requests admitted in the last ``window_s`` plus one stay within
    ``rpm`` and the tokens admitted in the last ``window_s`` plus its cost stay within ``tpm``
    (``None`` means unlimited). Thread-safe. Every admission is also kept in a full log so
    that :meth:`max_in_window` is exact.
    """

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_tokens = 0
        self._log: list[tuple[float, int]] = []

    def try_admit(self, cost: int) -> WindowState:
        """Admit a call costing ``cost`` tokens if both limits allow it."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            fits_requests = self.rpm is None or len(self._recent) + 1 <= self.rpm
            fits_tokens = self.tpm is None or self._recent_tokens + cost <= self.tpm
            admitted = fits_requests and fits_tokens
            if admitted:
                self._recent.append((now, cost))
                self._recent_tokens += cost
                self._log.append((now, cost))
            return self._state(now, cost, admitted)

    def peek(self, cost: int) -> WindowState:
        """The current state for a call costing ``cost``, admitting nothing."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            return self._state(now, cost, admitted=False)

    def reset(self) -> None:
        """Forget every admission."""
        with self._lock:
            self._recent.clear()
            self._recent_tokens = 0
            self._log.clear()

    def admissions(self) -> list[tuple[float, int]]:
        """A copy of the full admission log: ``(admitted_at, tokens)`` in admission order."""
        with self._lock:
            return list(self._log)

    def max_in_window(self) -> tuple[int, int]:
        """Most requests and most tokens admitted in any window so far."""
        with self._lock:
            log = list(self._log)
        return max_in_window(log, self.window_s)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._recent and self._recent[0][0] <= horizon:
            self._recent_tokens -= self._recent.popleft()[1]

    def _state(self, now: float, cost: int, admitted: bool) -> WindowState:
        count = len(self._recent)
        wait_requests = 0.0
        if self.rpm is not None and count + 1 > self.rpm:
            # The (count - rpm)-th oldest entry must leave before one more request fits.
            wait_requests = self._recent[count - self.rpm][0] + self.window_s - now
        wait_tokens = 0.0
        too_large = self.tpm is not None and cost > self.tpm
        if too_large:
            wait_tokens = self.window_s
        elif self.tpm is not None and self._recent_tokens + cost > self.tpm:
            held = self._recent_tokens
            for at, tokens in self._recent:
                held -= tokens
                if held + cost <= self.tpm:
                    wait_tokens = at + self.window_s - now
                    break
        wait = 0.0 if admitted else max(wait_requests, wait_tokens)
        return WindowState(
            admitted=admitted,
            too_large=too_large,
            limit_requests=self.rpm,
            remaining_requests=max(0, (self.rpm or 0) - count),
            reset_requests=max(0.0, wait_requests),
            limit_tokens=self.tpm,
            remaining_tokens=max(0, (self.tpm or 0) - self._recent_tokens),
            reset_tokens=max(0.0, wait_tokens),
            wait=max(0.0, wait),
            at=now,
        )
