"""The beat schedule, built from the environment (stored by redbeat in Redis).

redbeat keeps the schedule and a lock in Redis, so a second or restarted beat
process waits for the lock instead of firing the same entry again.
"""

from __future__ import annotations

from typing import Any

from jobs.constants import (
    QUEUE_CONTROL,
    TASK_DISPATCH,
    TASK_NIGHTLY_BATCH,
    TASK_PURGE,
    TASK_REQUEUE_STUCK,
)
from jobs.scheduled import parse_cron
from jobs.settings import ConfigError, Settings

#: Seconds between dispatcher sweeps fired by beat, on top of each worker's own loop.
DISPATCH_EVERY_S = 30.0


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    options = {"queue": QUEUE_CONTROL}
    schedule: dict[str, dict[str, Any]] = {
        "dispatch": {"task": TASK_DISPATCH, "schedule": DISPATCH_EVERY_S, "options": options},
        "requeue-stuck": {
            "task": TASK_REQUEUE_STUCK,
            "schedule": parse_cron(settings.maintenance_cron, "MAINTENANCE_CRON"),
            "options": options,
        },
    }
    # RESULT_RETENTION_DAYS=0 keeps bodies forever: no purge entry at all.
    if settings.result_retention_days > 0:
        schedule["purge"] = {
            "task": TASK_PURGE,
            "schedule": parse_cron(settings.purge_cron, "PURGE_CRON"),
            "options": options,
        }
    if settings.nightly_cron or settings.nightly_source:
        if not (settings.nightly_cron and settings.nightly_source):
            raise ConfigError("NIGHTLY_CRON and NIGHTLY_SOURCE must be set together")
        schedule["nightly-batch"] = {
            "task": TASK_NIGHTLY_BATCH,
            "schedule": parse_cron(settings.nightly_cron, "NIGHTLY_CRON"),
            "args": [settings.nightly_source, settings.nightly_name],
            "options": options,
        }
    return schedule
