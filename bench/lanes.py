"""Rows that may share the machine, run side by side, each in its own ``python -m bench``.

A row bound by the 150 RPM limit keeps a fraction of one core busy for its four to five
minutes, so running such rows one after another would leave the machine mostly idle and
the full run over an hour. Each lane is a child process (``python -m bench --child NAME``)
with its own Redis database, PostgreSQL database, simulator, key and workers; the rows
share only the CPU, and each row records which others ran alongside it. Rows whose
numbers depend on the CPU (overhead, the 10x limits) never run in a lane.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.rows import Row
from devstack.procs import ROOT

#: Seconds a lane gets to close its stack after SIGTERM (workers, simulator, databases).
LANE_STOP_TIMEOUT = 120.0
#: How often the parent looks for finished lanes.
POLL_S = 0.5
#: The provider's window: lanes start ``WINDOW_S / lanes`` apart (see run_side_by_side).
WINDOW_S = 60.0


@dataclass
class _Lane:
    name: str
    title: str
    redis_db: int
    out: Path
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.time)


def child_argv(name: str, redis_db: int, out: Path, logs: Path, quick: bool) -> list[str]:
    """The command line of the child process that runs one row."""
    argv = [sys.executable, "-m", "bench", "--child", name, "--row-json", str(out)]
    argv += ["--redis-db", str(redis_db), "--logs", str(logs)]
    return argv + (["--quick"] if quick else [])


def run_side_by_side(
    rows: Sequence[tuple[str, str]],
    *,
    redis_dbs: Sequence[int],
    logs: Path,
    quick: bool,
    on_row: Callable[[Row], None],
) -> None:
    """Run ``rows`` ((name, title) pairs) in up to ``len(redis_dbs)`` lanes at once.

    ``on_row`` gets each row as its lane finishes. A lane that dies without writing its
    row gives a row holding the error. Leaving early (an exception, SIGTERM turned into
    ``SystemExit``) stops every running lane and waits for it to close its stack.

    No two lanes start within ``WINDOW_S / lanes`` seconds of each other. Started
    together, their start-ups (workers, migrations, submission) competed for the CPU,
    which delayed the first calls by 3 to 6 s, and their windows then rolled at the
    same instants, each roll starting every row's burst of calls at once.
    """
    pending = list(rows)
    free = list(redis_dbs)
    gap_s = WINDOW_S / len(redis_dbs)
    running: list[_Lane] = []
    finished: list[tuple[str, float]] = []  # (name, end time) of each finished row
    last_start = -math.inf
    try:
        while pending or running:
            if pending and free and time.monotonic() - last_start >= gap_s:
                last_start = time.monotonic()
                name, title = pending.pop(0)
                db = free.pop(0)
                out = logs / f"{name}-row.json"
                out.unlink(missing_ok=True)
                proc = subprocess.Popen(
                    child_argv(name, db, out, logs, quick), cwd=ROOT, stdin=subprocess.DEVNULL
                )
                running.append(_Lane(name, title, db, out, proc))
                print(f"bench: {name} started (Redis database {db})", flush=True)
            time.sleep(POLL_S)
            for lane in [lane for lane in running if lane.proc.poll() is not None]:
                running.remove(lane)
                free.append(lane.redis_db)
                row = _read_row(lane)
                # Every row that overlapped this one has started by now.
                row.metrics["ran_alongside"] = (
                    ", ".join(
                        sorted(
                            [other.name for other in running]
                            + [name for name, end in finished if end > lane.started]
                        )
                    )
                    or "nothing"
                )
                finished.append((lane.name, time.time()))
                on_row(row)
    finally:
        _stop(running)


def _read_row(lane: _Lane) -> Row:
    try:
        return Row.from_dict(json.loads(lane.out.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        row = Row(lane.name, lane.title)
        row.error = (
            f"the lane exited with status {lane.proc.returncode} without its row "
            f"({type(exc).__name__}: {exc})"
        )
        row.seconds = time.time() - lane.started
        return row


def _stop(lanes: Sequence[_Lane]) -> None:
    for lane in lanes:
        if lane.proc.poll() is None:
            lane.proc.send_signal(signal.SIGTERM)
    for lane in lanes:
        try:
            lane.proc.wait(LANE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            lane.proc.kill()
            lane.proc.wait()
