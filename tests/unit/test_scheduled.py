"""Scheduled runs: cron parsing, run keys and request sources."""

from __future__ import annotations

import datetime as dt

import pytest

from jobs.constants import QUEUE_CONTROL, TASK_PURGE
from jobs.scheduled import is_file_source, last_slot, load_callable_requests, parse_cron, run_key
from jobs.settings import ConfigError, Settings
from worker.schedule import build_schedule


def sample_requests() -> list[dict[str, object]]:
    return [{"messages": [{"role": "user", "content": "hi"}]}]


def test_last_slot_is_the_latest_matching_minute() -> None:
    nightly = parse_cron("0 2 * * *", "NIGHTLY_CRON")
    now = dt.datetime(2026, 11, 29, 2, 0, 40, tzinfo=dt.UTC)
    assert last_slot(nightly, now) == dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.UTC)
    later = dt.datetime(2026, 11, 29, 1, 59, tzinfo=dt.UTC)
    assert last_slot(nightly, later) == dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)


def test_weekday_fields_count_from_sunday() -> None:
    sundays = parse_cron("30 4 * * 0", "NIGHTLY_CRON")
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)  # a Sunday
    assert last_slot(sundays, now) == dt.datetime(2026, 11, 29, 4, 30, tzinfo=dt.UTC)


def test_run_key_is_stable_within_a_slot() -> None:
    a = run_key("nightly", "0 2 * * *", dt.datetime(2026, 11, 29, 2, 0, 1, tzinfo=dt.UTC))
    b = run_key("nightly", "0 2 * * *", dt.datetime(2026, 11, 29, 2, 7, 0, tzinfo=dt.UTC))
    c = run_key("nightly", "0 2 * * *", dt.datetime(2026, 11, 30, 2, 0, 0, tzinfo=dt.UTC))
    assert a == b == "schedule:nightly:2026-11-29T02:00Z"
    assert c != a


@pytest.mark.parametrize("expr", ["0 2 * *", "61 2 * * *", "a b c d e"])
def test_bad_cron_names_the_setting(expr: str) -> None:
    with pytest.raises(ConfigError, match="NIGHTLY_CRON"):
        parse_cron(expr, "NIGHTLY_CRON")


def test_sources() -> None:
    assert is_file_source("requests/nightly.jsonl")
    assert not is_file_source("tests.unit.test_scheduled:sample_requests")
    requests = load_callable_requests("tests.unit.test_scheduled:sample_requests")
    assert list(requests) == sample_requests()
    assert list(load_callable_requests("tests.unit.test_scheduled.sample_requests"))
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_callable_requests("tests.unit.nope:thing")


def test_beat_schedule_from_settings() -> None:
    base = build_schedule(Settings())
    assert set(base) == {"dispatch", "requeue-stuck", "purge"}
    with_nightly = build_schedule(
        Settings(
            nightly_cron="0 2 * * *", nightly_source="tests.unit.test_scheduled:sample_requests"
        )
    )
    assert with_nightly["nightly-batch"]["args"] == [
        "tests.unit.test_scheduled:sample_requests",
        "nightly",
    ]
    with pytest.raises(ConfigError, match="together"):
        build_schedule(Settings(nightly_cron="0 2 * * *"))


def test_purge_is_scheduled_only_with_retention() -> None:
    entry = build_schedule(Settings(result_retention_days=7, purge_cron="15 1 * * *"))["purge"]
    assert entry["task"] == TASK_PURGE
    assert entry["options"] == {"queue": QUEUE_CONTROL}
    assert entry["schedule"] == parse_cron("15 1 * * *", "PURGE_CRON")
    assert "purge" not in build_schedule(Settings(result_retention_days=0))
    # A bad PURGE_CRON only matters when a purge is scheduled.
    assert "purge" not in build_schedule(Settings(result_retention_days=0, purge_cron="nope"))
    with pytest.raises(ConfigError, match="PURGE_CRON"):
        build_schedule(Settings(purge_cron="nope"))
