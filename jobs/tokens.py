"""Cheap, deliberately high estimate of the prompt tokens a chat-completion body will cost.

The throttle reserves ``estimate + max_tokens`` from the shared tokens-per-minute budget
before a call is sent, and settles to the provider's reported usage afterwards. An estimate
that comes out low lets a burst of calls overshoot the provider's limit and draw 429s for
everyone sharing the key; one that comes out high only leaves some budget idle until the
call settles. So every constant below is chosen to over-count, and the estimate never
tokenizes: it has to run for every line of a 100,000-line batch file at submission time.

Why these numbers:

* ``BYTES_PER_TOKEN = 3``: text is charged one token per 3 UTF-8 bytes. BPE tokenizers of the
  Kimi/GPT family average about 4 characters per token on English prose and 3-3.5 on code and
  JSON, so prose comes out about a third high and code up to about 15 % high. A CJK
  character is 3 bytes in UTF-8, so it is charged one token, while these vocabularies hold
  many multi-character CJK tokens (fewer than one token per character in practice).
  Counting bytes rather than characters is what keeps non-Latin scripts from being
  under-counted, as a characters-per-token rule would.
* ``MESSAGE_OVERHEAD = 6``: chat templates wrap each message in a role marker, the role name,
  a separator and an end marker (Kimi: ``<|im_user|>user<|im_middle|>...<|im_end|>``, 4
  tokens), and templates of reasoning models add an empty thinking block to past assistant
  turns (2 more).
* ``TOOL_RESULT_OVERHEAD = 8``: Kimi's template heads a tool result with a line like
  ``## Return of <tool_call_id>``; the id itself is counted as text on top of this.
* ``TOOL_CALL_OVERHEAD = 8``: a tool call in an assistant message is rendered with begin/end
  markers and an argument separator around its id, name and arguments, which are counted as
  text on top of this.
* ``TOOLS_OVERHEAD = 16`` plus the compact JSON of the ``tools`` array: templates render the
  declarations into an extra system section; the JSON text is what dominates.
* ``FIXED_OVERHEAD = 24``: the assistant priming at the end of the prompt (3 tokens) plus
  a default system prompt that Kimi's template inserts when the request has none ("You are
  Kimi, an AI assistant created by Moonshot AI.", about 16 tokens with its markers).

Known ways to go under: text made of rare characters (random base64, long digit strings,
unusual symbols) can reach 2-2.5 bytes per token, and non-text content parts (images) are
charged only by the size of their JSON, not by what a vision encoder would cost. Both are
rare in batch text workloads, and the throttle settles each call to its reported usage. A later
calibration can learn a per-model ratio from the ledger's estimate-versus-usage pairs.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Literal

#: The prompt's dominant script: tokenizers count Latin and CJK text very differently per
#: byte, so the calibration learns one ratio for each (:mod:`jobs.calibration`).
Script = Literal["latin", "cjk"]
#: Share of CJK characters above which a prompt counts as CJK.
CJK_SHARE = 0.3

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD = 6
TOOL_RESULT_OVERHEAD = 8
TOOL_CALL_OVERHEAD = 8
TOOLS_OVERHEAD = 16
FIXED_OVERHEAD = 24

# Message fields the template renders as text besides the content; Moonshot's API and
# Heroku's both echo reasoning back in assistant turns under one of the last two names.
_TEXT_FIELDS = ("name", "tool_call_id", "reasoning", "reasoning_content")

# Request fields outside messages and tools that some servers render into the prompt
# (a JSON schema for structured output, for example). Counting them costs little.
_EXTRA_PROMPT_FIELDS = ("response_format",)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _compact_json(value: object) -> str:
    try:
        return _ENCODER.encode(value)
    except (ValueError, RecursionError):
        # Circular or absurdly deep input, which validation refuses before estimating.
        return ""


def _utf8_len(text: str) -> int:
    if text.isascii():
        return len(text)
    # surrogatepass: a lone surrogate must not make the estimate itself raise.
    return len(text.encode("utf-8", "surrogatepass"))


def text_tokens(text: str) -> int:
    """Tokens charged for a piece of text: one per ``BYTES_PER_TOKEN`` UTF-8 bytes, rounded up."""
    return -(-_utf8_len(text) // BYTES_PER_TOKEN)


def text_of_content(content: object) -> str:
    """The text a message ``content`` contributes to the prompt.

    A string is itself; a list of content parts gives the ``text`` of each text part and
    the compact JSON of any other part, joined by newlines; ``None`` gives ``""``. Anything
    else (only seen before validation) is measured by its JSON so the estimate stays high.
    """
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if part.get("type") == "text" and isinstance(text, str):
                    pieces.append(text)
                    continue
            pieces.append(_compact_json(part))
        return "\n".join(pieces)
    return _compact_json(content)


def _message_tokens(message: object) -> int:
    if not isinstance(message, Mapping):
        return MESSAGE_OVERHEAD + text_tokens(_compact_json(message))
    total = MESSAGE_OVERHEAD + text_tokens(text_of_content(message.get("content")))
    if message.get("role") == "tool":
        total += TOOL_RESULT_OVERHEAD
    for name in _TEXT_FIELDS:
        value = message.get(name)
        if isinstance(value, str):
            total += text_tokens(value)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            total += TOOL_CALL_OVERHEAD + _tool_call_tokens(call)
    return total


def _tool_call_tokens(call: object) -> int:
    if not isinstance(call, Mapping):
        return text_tokens(_compact_json(call))
    function = call.get("function")
    call_id = call.get("id")
    total = text_tokens(call_id) if isinstance(call_id, str) else 0
    if isinstance(function, Mapping):
        for key in ("name", "arguments"):
            value = function.get(key)
            total += text_tokens(value if isinstance(value, str) else _compact_json(value))
    else:
        total += text_tokens(_compact_json(function))
    return total


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """A conservative (over-, not under-) estimate of the prompt tokens of a chat request.

    See the module docstring for where each constant comes from. The function is pure and
    tolerant of malformed input, so it never raises on a body that failed validation.
    """
    total = FIXED_OVERHEAD
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += _message_tokens(message)
    tools = body.get("tools")
    if tools:
        total += TOOLS_OVERHEAD + text_tokens(_compact_json(tools))
    for name in _EXTRA_PROMPT_FIELDS:
        value = body.get(name)
        if value is not None:
            total += text_tokens(_compact_json(value))
    return total


def _is_cjk(char: str) -> bool:
    return unicodedata.east_asian_width(char) in ("W", "F")


def dominant_script(body: Mapping[str, Any]) -> Script:
    """``cjk`` when enough of the prompt's characters are wide East Asian ones."""
    messages = body.get("messages")
    texts: Iterable[str] = (
        (text_of_content(m.get("content")) for m in messages if isinstance(m, dict))
        if isinstance(messages, list)
        else ()
    )
    total = cjk = 0
    for text in texts:
        for char in text[:20_000]:
            if not char.isspace():
                total += 1
                cjk += _is_cjk(char)
    return "cjk" if total and cjk / total >= CJK_SHARE else "latin"
