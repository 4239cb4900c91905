"""What counts as Postgres or Redis being briefly away, and bookkeeping that rides it out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from jobs.logfmt import log_event

#: Errors that mean "the service is briefly away", not "the request is wrong".
OUTAGES: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
)

T = TypeVar("T")


def quietly(what: str, step: Callable[[], T]) -> T | None:
    """Run a bookkeeping step that must not undo a recorded call if Redis is away.

    Returns the step's result, or None when Redis is away. A missed settle leaves
    the full reservation charged (the safe side); a missed release or observation
    costs a little throughput for one window; a missed restamp sends the call as
    granted (the ledger row written just before holds the start time a rebuilt
    bucket uses).
    """
    try:
        return step()
    except OUTAGES as exc:
        log_event("bookkeeping_skipped", step=what, error=type(exc).__name__)
        return None
