"""Logfmt lines (Heroku's log convention), ours and every library's.

Our events: ``event=succeeded job=42 batch=7 status=succeeded latency_ms=812 tokens=1203``.
Every other log record (Celery's, kombu's, a warning) becomes
``level=info logger=celery.apps.worker msg="celery@host ready."``, and an exception's
traceback folds into one ``exc="..."`` field, so a process writes no line that is not
logfmt. On a dyno each line ends with ``dyno=worker.1``; Heroku's router adds the time.

Bodies are never logged unless LOG_BODIES is set, and no field may carry the
inference key: callers pass ids, counts and short error messages only.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from types import TracebackType
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
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def format_fields(**fields: Any) -> str:
    """``key=value`` pairs in order; ``None`` fields are dropped."""
    return " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


def format_event(event: str, **fields: Any) -> str:
    """The logfmt line for ``event``; ``None`` fields are dropped."""
    return format_fields(event=event, **fields)


def log_event(event: str, **fields: Any) -> None:
    logger.info(format_event(event, **fields))


class LogfmtFormatter(logging.Formatter):
    """One logfmt line per record, whoever logged it."""

    def __init__(self, dyno: str | None = None) -> None:
        super().__init__()
        self.dyno = dyno

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == logger.name:
            line = message  # already logfmt (log_event)
        else:
            line = format_fields(
                level=record.levelname.lower(), logger=record.name, msg=message.strip()
            )
        if record.exc_info:
            line += " " + format_fields(exc=self.formatException(record.exc_info))
        if self.dyno:
            line += " " + format_fields(dyno=self.dyno)
        return line


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("uncaught").error("uncaught %s", kind.__name__, exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        logging.getLogger("uncaught").error(
            "uncaught %s in thread %s",
            args.exc_type.__name__,
            args.thread.name if args.thread else "?",
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )


def configure(level: int = logging.INFO, *, dyno: str | None = None) -> None:
    """Every record of this process, as logfmt, to stderr (a long-running process only).

    One handler on the root logger; warnings and uncaught exceptions go through it too.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(dyno))
    root.handlers = [handler]
    root.setLevel(level)
    logger.handlers = []
    logger.setLevel(level)
    logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught
