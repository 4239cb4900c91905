"""The beat scheduler: redbeat, made to survive a Redis that lost its data.

redbeat writes the schedule and its single-beat lock to Redis when beat starts,
and never again. After a Redis restart without persistence both are gone: the
lock's next renewal raises (and beat would exit), and with no schedule nothing
would ever fire. :class:`Scheduler` checks both before every tick, takes the
lock back (waiting while another beat holds it) and writes the schedule again.
A run fired twice across such a restart is harmless: scheduled batches carry an
idempotency key per slot. A tick that finds Redis unreachable (it is restarting)
is skipped and tried again a second later, rather than ending beat.
"""

from __future__ import annotations

from typing import Any

import redis
from redbeat import RedBeatScheduler
from redbeat.schedulers import get_redis

from jobs.logfmt import log_event


class Scheduler(RedBeatScheduler):  # type: ignore[misc]
    """:class:`redbeat.RedBeatScheduler` that rebuilds its lock and schedule when lost."""

    lock: Any

    #: Seconds before a tick that found Redis unreachable is tried again.
    RETRY_S = 1.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            return self._tick(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log_event("beat_redis_unreachable", error=type(exc).__name__, retry_s=self.RETRY_S)
            return self.RETRY_S

    def _tick(self, *args: Any, **kwargs: Any) -> float:
        client = get_redis(self.app)
        if self.lock_key and self.lock is not None and not client.exists(self.lock_key):
            log_event("beat_lock_lost", action="waiting for the lock again")
            self.lock = client.lock(
                self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval
            )
            self.lock.acquire()
        if not client.exists(self.app.redbeat_conf.schedule_key):
            log_event("beat_schedule_lost", action="writing the schedule again")
            self.setup_schedule()
        interval: float = super().tick(*args, **kwargs)
        return interval
