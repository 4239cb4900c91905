"""One logfmt line per job event (Heroku's log convention).

``event=succeeded job=42 batch=7 status=succeeded latency_ms=812 tokens=1203``.
Bodies are never logged unless LOG_BODIES is set, and no field may carry the
inference key: callers pass ids, counts and short error messages only.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger("batch_infer")

_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-]+$")


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    if _BARE.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_event(event: str, **fields: Any) -> str:
    """The logfmt line for ``event``; ``None`` fields are dropped."""
    parts = [f"event={_value(event)}"]
    parts.extend(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
    return " ".join(parts)


def log_event(event: str, **fields: Any) -> None:
    logger.info(format_event(event, **fields))


def configure(level: int = logging.INFO) -> None:
    """Plain lines on stderr: Heroku's router adds the timestamp and dyno name."""
    root = logging.getLogger("batch_infer")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
