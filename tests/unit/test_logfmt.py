"""Job events are single logfmt lines."""

from __future__ import annotations

from collections.abc import Callable

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


def test_log_event_writes_one_line(events: Callable[[], list[str]]) -> None:
    log_event("succeeded", job=1, tokens=30)
    assert events() == ["event=succeeded job=1 tokens=30"]
