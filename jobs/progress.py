"""A batch's progress as one line: a bar on a terminal, a line every few seconds in logs."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from jobs.api import BatchProgress


def progress_line(p: BatchProgress, width: int = 30) -> str:
    fraction = p.done / p.total if p.total else 1.0
    filled = round(fraction * width)
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"[{bar}] {p.done}/{p.total} {fraction:6.1%}  "
        f"ok {p.succeeded}  failed {p.failed}  running {p.running}  queued {p.queued}"
    )


class ProgressPrinter:
    """A progress bar on a terminal; a line every few seconds elsewhere (logs)."""

    def __init__(
        self,
        stream: TextIO = sys.stderr,
        every_s: float = 5.0,
        pace: Callable[[], str] | None = None,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._last_line = ""
        self._bar_open = False
        # The batch's rate and expected end (a few queries): read again every_s at most.
        self._pace = pace
        self._pace_text, self._pace_at = "", -math.inf
        self._width = 0

    def _paced(self, line: str, final: bool) -> str:
        if self._pace is None or final:
            return line
        now = time.monotonic()
        if now - self._pace_at >= self.every_s:
            self._pace_text, self._pace_at = self._pace(), now
        return f"{line}  {self._pace_text}" if self._pace_text else line

    def __call__(self, progress: BatchProgress) -> None:
        final = progress.finished and progress.running == 0
        line = self._paced(progress_line(progress), final)
        if self.tty:
            # Padded: a shorter line must cover the one before it.
            self._width = max(self._width, len(line))
            self.stream.write("\r" + line.ljust(self._width))
            self._bar_open = not final
            if final:
                self.stream.write("\n")
            self.stream.flush()
            return
        now = time.monotonic()
        if (now - self._last >= self.every_s and line != self._last_line) or final:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last, self._last_line = now, line

    def notice(self, message: str) -> None:
        """One line of news (an outage, no worker) that does not break the bar."""
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        self.stream.write(f"batch-infer: {message}\n")
        self.stream.flush()
