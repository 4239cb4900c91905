"""Job events are single logfmt lines."""

from __future__ import annotations

import logging

import pytest

from jobs.logfmt import format_event, log_event


def test_format_quotes_only_what_needs_it() -> None:
    line = format_event(
        "failed", job=42, batch=None, latency_ms=812, error="server_error", message='bad "x"\nend'
    )
    assert line == (
        'event=failed job=42 latency_ms=812 error=server_error message="bad \\"x\\"\\nend"'
    )


def test_floats_and_bools() -> None:
    assert (
        format_event("retry", delay_s=1.5, created=True) == "event=retry delay_s=1.5 created=true"
    )


def test_log_event_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("batch_infer")
    logger.propagate = True
    with caplog.at_level(logging.INFO, logger="batch_infer"):
        log_event("succeeded", job=1, tokens=30)
    assert [r.getMessage() for r in caplog.records] == ["event=succeeded job=1 tokens=30"]
