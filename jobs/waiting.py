"""Waiting for a job or a batch to end: riding out outages, noticing that no worker runs.

A wait loop (:meth:`jobs.api.BatchHandle.wait`, :meth:`jobs.api.JobHandle.wait`) reads
Postgres every poll through a :class:`Watch`, which:

1. returns the read, or ``None`` while Postgres is away: it says so once per outage, in
   one line, and keeps polling for up to :data:`OUTAGE_LIMIT_S`, as the workers do;
2. every :data:`WORKER_CHECK_EVERY_S` (the first time one interval after the wait
   starts, so that a worker started with it has time to mark itself), asks Redis
   whether any worker process is alive (:mod:`jobs.presence`) and, when none is, says
   so once, with how to start one; a Redis that is away is said once too, and only
   delays that check;
3. never raises for an outage shorter than the limit; after it, raises
   :class:`~jobs.environment.ServiceError` with the same one line.

What is said goes to ``notify`` (the CLI writes it to stderr), one line per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from jobs import presence
from jobs.connections import shared_redis
from jobs.environment import ServiceError, database_label, redis_label
from jobs.settings import Settings

#: Longest Postgres outage a wait rides out before it gives up, seconds.
OUTAGE_LIMIT_S = 600.0
#: Seconds between two checks that a worker is alive.
WORKER_CHECK_EVERY_S = 5.0

T = TypeVar("T")
logger = logging.getLogger("batch_infer")


def log_notice(message: str) -> None:
    """The default ``notify``: a warning on the ``batch_infer`` logger."""
    logger.warning(message)


class Watch:
    """The state of one wait: outages under way, and what was already said."""

    def __init__(self, settings: Settings, notify: Callable[[str], None] | None = None) -> None:
        assert settings.database_url is not None and settings.redis_url is not None
        self._settings = settings
        self._notify = notify or log_notice
        self._db_away_since: float | None = None
        self._redis_away = False
        self._said_no_worker = False
        # A worker started together with the wait gets one interval to mark itself.
        self._next_worker_check = time.monotonic() + WORKER_CHECK_EVERY_S

    def read(self, fetch: Callable[[], T]) -> T | None:
        """``fetch()``, or ``None`` while Postgres is away (said once per outage)."""
        try:
            value = fetch()
        except (OperationalError, InterfaceError):
            now = time.monotonic()
            where = database_label(self._settings.database_url or "")
            if self._db_away_since is None:
                self._db_away_since = now
                self._notify(f"PostgreSQL at {where} is unreachable; still waiting")
            elif now - self._db_away_since > OUTAGE_LIMIT_S:
                raise ServiceError(
                    f"PostgreSQL at {where} (DATABASE_URL) has been unreachable for "
                    f"{OUTAGE_LIMIT_S:.0f} s; the batch goes on, check it later with `status`",
                    retryable=True,
                ) from None
            return None
        self._db_away_since = None
        return value

    def check_workers(self) -> None:
        """Say once if no worker process is alive; a Redis outage is said once and skipped."""
        now = time.monotonic()
        if now < self._next_worker_check:
            return
        self._next_worker_check = now + WORKER_CHECK_EVERY_S
        url = self._settings.redis_url or ""
        try:
            alive = presence.live_workers(shared_redis(url))
        except (redis.ConnectionError, redis.TimeoutError):
            if not self._redis_away:
                self._redis_away = True
                self._notify(f"Redis at {redis_label(url)} is unreachable; still waiting")
            return
        self._redis_away = False
        if alive == 0 and not self._said_no_worker:
            self._said_no_worker = True
            self._notify(f"no worker is consuming the queue: {presence.START_HINT}")
        elif alive > 0:
            self._said_no_worker = False
