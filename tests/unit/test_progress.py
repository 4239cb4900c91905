"""The progress line of ``submit --wait``: the bar, then the batch's pace, read again at
most every few seconds, and left off the last line."""

from __future__ import annotations

import io

from jobs.handles import BatchProgress
from jobs.progress import ProgressPrinter


def progress(done: int, status: str = "in_progress") -> BatchProgress:
    return BatchProgress(
        id=1, name="b", source="api", status=status, total=10, queued=10 - done,
        running=0, succeeded=done, failed=0, cancelled=0,
    )  # fmt: skip


def test_the_pace_follows_the_bar_and_is_read_at_most_every_few_seconds() -> None:
    reads: list[int] = []

    def pace() -> str:
        reads.append(1)
        return f"pace #{len(reads)}"

    out = io.StringIO()
    printer = ProgressPrinter(out, every_s=0.0, pace=pace)
    printer(progress(1))
    printer(progress(2))
    first, second = out.getvalue().splitlines()
    assert first.startswith("[###---") and first.endswith("queued 9  pace #1")
    assert second.startswith("[######---") and second.endswith("queued 8  pace #2")
    slow = ProgressPrinter(io.StringIO(), every_s=3600.0, pace=pace)
    slow(progress(1))
    slow(progress(2))
    assert len(reads) == 3  # once for the slow printer's first line, not again
    ended = io.StringIO()
    ProgressPrinter(ended, every_s=0.0, pace=pace)(progress(10, "completed"))
    assert "pace" not in ended.getvalue()
