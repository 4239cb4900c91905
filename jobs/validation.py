"""Validation of chat-completion request bodies before anything is stored or sent.

:func:`check_request` refuses what the provider would refuse (so no call is wasted on a
400) and what the system itself cannot handle: streaming, ``n`` other than 1, a request
that can never fit the context window or the tokens-per-minute budget, and values Postgres
cannot store in a JSONB column (NUL characters, unpaired surrogates, non-finite numbers,
nesting deeper than :data:`~jobs.jsoncheck.MAX_JSON_DEPTH`). Every other field passes
through untouched.

Errors are :class:`ValidationError`, whose message always says where the problem is:
``line 12: body.messages[0].role: unknown role 'robot' (expected one of ...)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.jsoncheck import child_field, is_int, is_number, json_kind, json_problem, show_value
from jobs.tokens import estimate_prompt_tokens

if TYPE_CHECKING:
    from jobs.settings import Settings

#: Width of the ``jobs.model`` column.
MAX_MODEL_CHARS = 200
#: How many problems a :class:`BatchValidationError` spells out.
MAX_REPORTED_ERRORS = 20

ROLES = ("assistant", "developer", "system", "tool", "user")
TOOL_CHOICES = ("auto", "none", "required")
MAX_STOP_SEQUENCES = 4
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ValidationError(ValueError):
    """A request or batch line that cannot be accepted; the message names where and why.

    ``reason`` is the bare explanation, ``field`` the dotted path of the offending value
    (``body.messages[2].content``) and ``line`` the 1-based line or request number that
    ``label`` ("line" or "request") refers to.
    """

    line: int | None
    field: str | None
    reason: str
    label: str

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        line: int | None = None,
        label: str = "line",
    ) -> None:
        self.reason = reason
        self.field = field
        self.line = line
        self.label = label
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"{self.label} {self.line}")
        if self.field:
            where.append(self.field)
        return ": ".join([*where, self.reason])

    def at(self, line: int, label: str = "line") -> ValidationError:
        """The same problem, located at ``line`` of a file or batch."""
        return ValidationError(self.reason, field=self.field, line=line, label=label)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments would otherwise break pickling across processes.
        return (_rebuild, (self.reason, self.field, self.line, self.label))


def _rebuild(reason: str, field: str | None, line: int | None, label: str) -> ValidationError:
    return ValidationError(reason, field=field, line=line, label=label)


class BatchValidationError(ValidationError):
    """Every problem found in a batch, raised once so the user can fix them all at once.

    ``errors`` holds at most :data:`MAX_REPORTED_ERRORS` problems; ``total`` counts all of
    them. With a single problem the message is that problem's own message.
    """

    errors: list[ValidationError]
    total: int

    def __init__(self, errors: Sequence[ValidationError], *, total: int | None = None) -> None:
        if not errors:
            raise ValueError("BatchValidationError needs at least one error")
        self.errors = list(errors[:MAX_REPORTED_ERRORS])
        self.total = max(total or 0, len(errors))
        first = self.errors[0]
        if self.total == 1:
            self.reason, self.field, self.line = first.reason, first.field, first.line
            self.label = first.label
        else:
            shown = len(self.errors)
            more = f", first {shown} shown" if shown < self.total else ""
            self.reason = f"{self.total} problems found{more}"
            self.field, self.line, self.label = None, None, first.label
        ValueError.__init__(self, self._render())

    def _render(self) -> str:
        if self.total == 1:
            return str(self.errors[0])
        lines = [self.reason + ":"]
        lines.extend(f"  {error}" for error in self.errors)
        hidden = self.total - len(self.errors)
        if hidden:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_batch, (self.errors, self.total))


def _rebuild_batch(errors: list[ValidationError], total: int) -> BatchValidationError:
    return BatchValidationError(errors, total=total)


@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit into: the model's context, the key's tokens/minute budget."""

    context_tokens: int
    tpm: int
    #: Completion tokens assumed for a request without ``max_tokens``.
    default_max_tokens: int
    #: The models some attachment serves; ``None`` accepts any model.
    known_models: frozenset[str] | None = None


def request_limits(settings: Settings) -> RequestLimits:
    """What a request must fit into on the deployment's pool of attachments: it is
    valid when one attachment serving its model can take it."""
    attachments = settings.attachments
    return RequestLimits(
        context_tokens=max(a.context_tokens for a in attachments),
        tpm=max(a.tpm for a in attachments),
        default_max_tokens=settings.default_max_tokens,
        known_models=settings.served_models,
    )


@dataclass(frozen=True)
class CheckedRequest:
    """A valid request: the body as given, plus what the throttle needs to know about it."""

    body: dict[str, Any]
    model: str
    max_tokens: int | None
    est_prompt_tokens: int


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_model(body: dict[str, Any], limits: RequestLimits, prefix: str) -> str:
    where = _join(prefix, "model")
    if "model" not in body:
        raise ValidationError("missing (the model id, a non-empty string)", field=where)
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise ValidationError(f"must be a non-empty string, got {show_value(model)}", field=where)
    if len(model) > MAX_MODEL_CHARS:
        raise ValidationError(
            f"model id is {len(model)} characters long (at most {MAX_MODEL_CHARS})", field=where
        )
    if limits.known_models is not None and model not in limits.known_models:
        # Only a model some attachment serves can be called.
        served = ", ".join(sorted(limits.known_models))
        raise ValidationError(
            f"model {show_value(model)} is served by no attachment (served: {served}); to "
            "use it, attach one that serves it to INFERENCE_POOL, or set INFERENCE_MODEL_ID "
            "to it with its INFERENCE_RPM and INFERENCE_TPM",
            field=where,
        )
    return model


def _check_content(message: dict[str, Any], where: str) -> None:
    field = f"{where}.content"
    content = message.get("content")
    if content is None:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            return
        raise ValidationError(
            "missing or null (only an assistant message with tool_calls may omit content)",
            field=field,
        )
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValidationError(
            f"must be a string or a list of content parts, got {json_kind(content)}", field=field
        )
    if not content:
        raise ValidationError("must not be an empty list", field=field)
    for j, part in enumerate(content):
        part_field = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise ValidationError(
                f"a content part must be an object, got {json_kind(part)}", field=part_field
            )
        kind = part.get("type")
        if not isinstance(kind, str) or not kind:
            raise ValidationError(
                f'"type" must be a non-empty string, got {show_value(kind)}',
                field=f"{part_field}.type",
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise ValidationError(
                f'a "text" part needs a string "text", got {show_value(part.get("text"))}',
                field=f"{part_field}.text",
            )


def _check_tool_calls(message: dict[str, Any], where: str) -> None:
    calls = message.get("tool_calls")
    if calls is None:
        return
    field = f"{where}.tool_calls"
    if message.get("role") != "assistant":
        raise ValidationError("only assistant messages may carry tool_calls", field=field)
    if not isinstance(calls, list) or not calls:
        raise ValidationError(
            f"must be a non-empty list of tool calls, got {show_value(calls)}", field=field
        )
    for j, call in enumerate(calls):
        call_field = f"{field}[{j}]"
        if not isinstance(call, dict):
            raise ValidationError(
                f"a tool call must be an object, got {json_kind(call)}", field=call_field
            )
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ValidationError(
                f"must be a non-empty string, got {show_value(call_id)}", field=f"{call_field}.id"
            )
        if call.get("type") != "function":
            raise ValidationError(
                f"must be 'function', got {show_value(call.get('type'))}",
                field=f"{call_field}.type",
            )
        function = call.get("function")
        if not isinstance(function, dict):
            raise ValidationError(
                f'must be an object {{"name": str, "arguments": str}}, got {json_kind(function)}',
                field=f"{call_field}.function",
            )
        for key in ("name", "arguments"):
            value = function.get(key)
            if not isinstance(value, str):
                raise ValidationError(
                    f"must be a string, got {show_value(value)}",
                    field=f"{call_field}.function.{key}",
                )


def _check_messages(body: dict[str, Any], prefix: str) -> None:
    field = _join(prefix, "messages")
    if "messages" not in body:
        raise ValidationError("missing (a non-empty list of messages is required)", field=field)
    messages = body["messages"]
    if not isinstance(messages, list):
        raise ValidationError(f"must be a list of messages, got {json_kind(messages)}", field=field)
    if not messages:
        raise ValidationError("must contain at least one message", field=field)
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ValidationError(
                f"a message must be an object, got {json_kind(message)}", field=where
            )
        role = message.get("role")
        if role not in ROLES:
            what = "missing role" if role is None else f"unknown role {show_value(role)}"
            raise ValidationError(
                f"{what} (expected one of {', '.join(ROLES)})", field=f"{where}.role"
            )
        _check_tool_calls(message, where)
        _check_content(message, where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ValidationError(
                    "a tool message needs a non-empty string tool_call_id, "
                    f"got {show_value(call_id)}",
                    field=f"{where}.tool_call_id",
                )


def _check_tools(body: dict[str, Any], prefix: str) -> set[str]:
    tools = body.get("tools")
    if tools is None:
        return set()
    field = _join(prefix, "tools")
    if not isinstance(tools, list) or not tools:
        raise ValidationError(
            f"must be a non-empty list of tools, got {show_value(tools)}", field=field
        )
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict):
            raise ValidationError(f"a tool must be an object, got {json_kind(tool)}", field=where)
        if tool.get("type") != "function":
            raise ValidationError(
                f"must be 'function', got {show_value(tool.get('type'))}", field=f"{where}.type"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValidationError(
                f"must be an object with a name, got {json_kind(function)}",
                field=f"{where}.function",
            )
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ValidationError(
                f"must match ^[A-Za-z0-9_-]{{1,64}}$, got {show_value(name)}",
                field=f"{where}.function.name",
            )
        if name in names:
            raise ValidationError(
                f"duplicate function name {name!r}", field=f"{where}.function.name"
            )
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValidationError(
                f"must be a string, got {json_kind(description)}",
                field=f"{where}.function.description",
            )
        _check_parameters(function.get("parameters"), f"{where}.function.parameters")
    return names


def _check_parameters(parameters: object, field: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise ValidationError(
            f'must be a JSON Schema object with "type": "object", got {json_kind(parameters)}',
            field=field,
        )
    if parameters.get("type") != "object":
        raise ValidationError(
            f'a JSON Schema with "type": "object" is required, got type '
            f"{show_value(parameters.get('type'))}",
            field=f"{field}.type",
        )
    properties = parameters.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise ValidationError(
            f"must be an object mapping names to schemas, got {json_kind(properties)}",
            field=f"{field}.properties",
        )
    for name, schema in (properties or {}).items():
        # A JSON Schema is an object or a boolean; "city": "string" is a common slip.
        if not isinstance(schema, dict | bool):
            raise ValidationError(
                f"a property's schema must be a JSON Schema object, got {show_value(schema)}",
                field=child_field(f"{field}.properties", name),
            )
    required = parameters.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        raise ValidationError(
            f"must be a list of property names, got {show_value(required)}",
            field=f"{field}.required",
        )


def _check_tool_choice(body: dict[str, Any], prefix: str, declared: set[str]) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    field = _join(prefix, "tool_choice")
    if not declared:
        raise ValidationError("is set but the request declares no tools", field=field)
    if isinstance(choice, str) and choice in TOOL_CHOICES:
        return
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name in declared:
            return
        raise ValidationError(
            f"names function {show_value(name)}, which is not among the declared tools "
            f"({', '.join(sorted(declared))})",
            field=f"{field}.function.name",
        )
    raise ValidationError(
        f"must be one of {', '.join(TOOL_CHOICES)} or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {show_value(choice)}',
        field=field,
    )


def _check_sampling(body: dict[str, Any], prefix: str) -> None:
    temperature = body.get("temperature")
    if temperature is not None and not (is_number(temperature) and 0 <= temperature <= 2):
        raise ValidationError(
            f"must be a number from 0 to 2, got {show_value(temperature)}",
            field=_join(prefix, "temperature"),
        )
    top_p = body.get("top_p")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise ValidationError(
            f"must be a number above 0 and at most 1, got {show_value(top_p)}",
            field=_join(prefix, "top_p"),
        )
    n = body.get("n")
    if n is not None and not (is_int(n) and n == 1):
        raise ValidationError(
            f"only n=1 is supported for batch jobs, got {show_value(n)}", field=_join(prefix, "n")
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ValidationError(
            f"must be a boolean, got {show_value(stream)}", field=_join(prefix, "stream")
        )
    if stream:
        raise ValidationError(
            "streaming is not supported for batch jobs", field=_join(prefix, "stream")
        )
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (
            isinstance(stop, list)
            and len(stop) <= MAX_STOP_SEQUENCES
            and all(isinstance(s, str) for s in stop)
        )
    ):
        raise ValidationError(
            f"must be a string or a list of up to {MAX_STOP_SEQUENCES} strings, "
            f"got {show_value(stop)}",
            field=_join(prefix, "stop"),
        )


def _check_extended_thinking(body: dict[str, Any], prefix: str) -> None:
    thinking = body.get("extended_thinking")
    if thinking is None:
        return
    field = _join(prefix, "extended_thinking")
    if not isinstance(thinking, dict):
        raise ValidationError(
            "must be an object {enabled, budget_tokens, include_reasoning}, "
            f"got {json_kind(thinking)}",
            field=field,
        )
    for key in ("enabled", "include_reasoning"):
        value = thinking.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValidationError(
                f"must be a boolean, got {show_value(value)}", field=f"{field}.{key}"
            )
    budget = thinking.get("budget_tokens")
    if budget is not None and not (is_int(budget) and budget >= 1):
        raise ValidationError(
            f"must be an integer >= 1, got {show_value(budget)}", field=f"{field}.budget_tokens"
        )


#: The fields that bound a completion: OpenAI's newer name first, then the older one.
BUDGET_FIELDS = ("max_completion_tokens", "max_tokens")


def completion_budget(body: dict[str, Any], prefix: str = "body") -> int | None:
    """The completion tokens a request allows: ``max_completion_tokens`` or ``max_tokens``.

    Either name is accepted (OpenAI deprecated the second for the first); both at once
    must agree. ``None`` when neither is given.
    """
    found: dict[str, int] = {}
    for name in BUDGET_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not (is_int(value) and value >= 1):
            raise ValidationError(
                f"must be an integer >= 1, got {show_value(value)}", field=_join(prefix, name)
            )
        found[name] = value
    if len(set(found.values())) > 1:
        raise ValidationError(
            f"is {found['max_completion_tokens']} but max_tokens is {found['max_tokens']}: "
            "give one, or the same value in both",
            field=_join(prefix, "max_completion_tokens"),
        )
    return next(iter(found.values()), None)


def _check_budget(est: int, max_tokens: int | None, limits: RequestLimits, prefix: str) -> None:
    field = _join(prefix, "max_tokens" if max_tokens is not None else "messages")
    if max_tokens is not None and est + max_tokens > limits.context_tokens:
        raise ValidationError(
            f"the prompt (about {est} tokens, estimated) plus max_tokens {max_tokens} "
            f"exceeds the model's {limits.context_tokens}-token context",
            field=field,
        )
    if max_tokens is None and est >= limits.context_tokens:
        raise ValidationError(
            f"the prompt (about {est} tokens, estimated) leaves no room for a reply in the "
            f"model's {limits.context_tokens}-token context",
            field=field,
        )
    completion = max_tokens if max_tokens is not None else limits.default_max_tokens
    if est + completion > limits.tpm:
        source = "max_tokens" if max_tokens is not None else "the default max_tokens"
        raise ValidationError(
            f"the request needs about {est + completion} tokens (prompt about {est}, "
            f"{source} {completion}), so it can never fit the tokens-per-minute budget "
            f"of {limits.tpm}",
            field=field,
        )


def check_request(
    body: object, limits: RequestLimits, *, field_prefix: str = "body"
) -> CheckedRequest:
    """Validate one chat-completion body; return it (the same dict) with its token figures.

    Raises :class:`ValidationError` whose ``field`` starts with ``field_prefix`` and names
    the first offending value. ``null`` counts as absent for every optional field.
    """
    prefix = field_prefix
    if not isinstance(body, dict):
        raise ValidationError(f"must be a JSON object, got {json_kind(body)}", field=prefix or None)
    problem = json_problem(body, prefix)
    if problem is not None:
        raise ValidationError(problem.reason, field=problem.field)
    model = _check_model(body, limits, prefix)
    _check_messages(body, prefix)
    declared = _check_tools(body, prefix)
    _check_tool_choice(body, prefix, declared)
    max_tokens = completion_budget(body, prefix)
    _check_sampling(body, prefix)
    _check_extended_thinking(body, prefix)
    est = estimate_prompt_tokens(body)
    _check_budget(est, max_tokens, limits, prefix)
    return CheckedRequest(body=body, model=model, max_tokens=max_tokens, est_prompt_tokens=est)
