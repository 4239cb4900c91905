"""Scheduled (nightly) batches: where their requests come from and their run key.

NIGHTLY_SOURCE names either a JSONL file in OpenAI Batch format or a dotted
path ``package.module:callable`` (or ``package.module.callable``) returning an
iterable of requests. Each run is keyed by the cron slot it belongs to, so a
duplicated or re-fired beat message creates the batch once.
"""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Iterable
from pathlib import Path

from celery.schedules import crontab

from jobs.settings import ConfigError


def parse_cron(expr: str, name: str) -> crontab:
    """A Celery crontab from a five-field cron string; ``name`` is the setting's name."""
    if len(expr.split()) != 5:
        raise ConfigError(f"{name} must have five cron fields (m h dom mon dow), got {expr!r}")
    try:
        return crontab.from_string(expr)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def last_slot(schedule: crontab, now: dt.datetime) -> dt.datetime:
    """The latest minute at or before ``now`` (UTC) that ``schedule`` matches."""
    minute = now.astimezone(dt.UTC).replace(second=0, microsecond=0)
    # The expanded sets of each field (the type stubs do not declare them).
    fields: tuple[set[int], ...] = tuple(
        getattr(schedule, name)
        for name in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
    )
    for _ in range(60 * 24 * 366):
        # crontab counts weekdays from Sunday = 0; isoweekday has Sunday = 7.
        values = (
            minute.minute,
            minute.hour,
            minute.day,
            minute.month,
            minute.isoweekday() % 7,
        )
        if all(value in field for value, field in zip(values, fields, strict=True)):
            return minute
        minute -= dt.timedelta(minutes=1)
    raise ConfigError("the nightly cron expression never matches")


def run_key(name: str, cron: str, now: dt.datetime) -> str:
    """Idempotency key of the scheduled run that ``now`` belongs to."""
    slot = last_slot(parse_cron(cron, "NIGHTLY_CRON"), now)
    return f"schedule:{name}:{slot:%Y-%m-%dT%H:%MZ}"


def is_file_source(source: str) -> bool:
    return source.endswith((".jsonl", ".json")) or "/" in source or Path(source).is_file()


def load_callable_requests(source: str) -> Iterable[object]:
    """Import ``package.module:callable`` (or the dotted form) and call it."""
    module_name, sep, attr = source.partition(":")
    if not sep:
        module_name, _, attr = source.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"NIGHTLY_SOURCE {source!r} is neither a file nor module:callable")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"NIGHTLY_SOURCE {source!r} cannot be imported: {exc}") from None
    if not callable(target):
        raise ConfigError(f"NIGHTLY_SOURCE {source!r} is not callable")
    requests = target()
    if not isinstance(requests, Iterable):
        raise ConfigError(f"NIGHTLY_SOURCE {source!r} returned {type(requests).__name__}")
    return requests
