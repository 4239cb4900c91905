"""Read the Postgres ledger and turn admission timestamps into rates and percentiles.

The simulator's ``/stats`` has totals but no timeline, so every time-resolved figure comes
from the ``attempts`` ledger: a row per HTTP call, ``started_at`` set by the database when
the call is about to be sent. A call answered 200 is one the simulator admitted, so the
ledger's 200 rows are the admission timeline (each a few milliseconds early).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from bench.stack import conninfo


@dataclass(frozen=True)
class Call:
    """One ledger row (one HTTP call)."""

    started: float
    status: int | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_s: float | None
    job_id: int
    priority: int
    #: The attachment of the pool the call went through (its alias).
    attachment: str | None = None


def calls(database_url: str) -> list[Call]:
    """Every attempt, oldest first; ``status`` is ``None`` while the call is in flight."""
    query = """
        SELECT extract(epoch FROM a.started_at)::float8, a.http_status, a.prompt_tokens,
               a.completion_tokens, a.total_tokens, a.latency_ms, a.job_id, j.priority,
               a.attachment
        FROM attempts a JOIN jobs j ON j.id = a.job_id
        ORDER BY a.started_at, a.id
    """
    with psycopg.connect(conninfo(database_url)) as conn:
        rows = conn.execute(query).fetchall()
    return [
        Call(
            started=float(r[0]),
            status=None if r[1] is None else int(r[1]),
            prompt_tokens=int(r[2]),
            completion_tokens=int(r[3]),
            total_tokens=int(r[4]),
            latency_s=None if r[5] is None else int(r[5]) / 1000.0,
            job_id=int(r[6]),
            priority=int(r[7]),
            attachment=r[8],
        )
        for r in rows
    ]


def job_counts(database_url: str) -> dict[str, int]:
    """Jobs by status."""
    with psycopg.connect(conninfo(database_url)) as conn:
        rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
    return {str(status): int(count) for status, count in rows}


def in_flight(database_url: str) -> int:
    """Calls begun and not yet answered."""
    with psycopg.connect(conninfo(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM attempts WHERE http_status IS NULL").fetchone()
    return int(row[0]) if row else 0


def batch_span(database_url: str, batch_id: int) -> tuple[float, float | None]:
    """A batch's creation and finish times (database clock, epoch seconds)."""
    query = """
        SELECT extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8
        FROM batches WHERE id = %s
    """
    with psycopg.connect(conninfo(database_url)) as conn:
        row = conn.execute(query, (batch_id,)).fetchone()
    if row is None:
        raise LookupError(f"batch {batch_id} is not in the ledger")
    return float(row[0]), None if row[1] is None else float(row[1])


def first_call_waits(
    database_url: str,
    priority: int,
    *,
    created_after: float = 0.0,
    created_before: float = float("inf"),
) -> tuple[list[float], int]:
    """Seconds from a job's creation to its first call, for jobs of ``priority``
    created between the Unix times ``created_after`` and ``created_before``.

    Returns the waits of jobs that made a call and how many never did.
    """
    query = """
        SELECT extract(epoch FROM (min(a.started_at) - j.created_at))::float8
        FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id
        WHERE j.priority = %s AND j.created_at > to_timestamp(%s)
          AND j.created_at < to_timestamp(%s)
        GROUP BY j.id, j.created_at
    """
    with psycopg.connect(conninfo(database_url)) as conn:
        rows = conn.execute(query, (priority, created_after, created_before)).fetchall()
    waits = [float(r[0]) for r in rows if r[0] is not None]
    return waits, sum(1 for r in rows if r[0] is None)


def slow_first_calls(
    database_url: str, priority: int, *, since: float, over_s: float
) -> list[tuple[float, float]]:
    """``(created s after since, wait s)`` of the jobs of ``priority`` whose first call
    came more than ``over_s`` after their creation, oldest first."""
    query = """
        SELECT extract(epoch FROM j.created_at)::float8 - %s,
               extract(epoch FROM (min(a.started_at) - j.created_at))::float8 AS wait
        FROM jobs j JOIN attempts a ON a.job_id = j.id
        WHERE j.priority = %s
        GROUP BY j.id, j.created_at
        HAVING extract(epoch FROM (min(a.started_at) - j.created_at)) > %s
        ORDER BY j.created_at
    """
    with psycopg.connect(conninfo(database_url)) as conn:
        rows = conn.execute(query, (since, priority, over_s)).fetchall()
    return [(float(r[0]), float(r[1])) for r in rows]


def first_admission(database_url: str) -> float | None:
    """When the first admitted (HTTP 200) call started, if any has finished yet."""
    query = (
        "SELECT extract(epoch FROM min(started_at))::float8 FROM attempts WHERE http_status = 200"
    )
    with psycopg.connect(conninfo(database_url)) as conn:
        row = conn.execute(query).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def database_bytes(database_url: str) -> int:
    """Size of the database on disk."""
    with psycopg.connect(conninfo(database_url)) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


# -- timeline arithmetic -------------------------------------------------------------------


def max_in_window(times: Sequence[float], costs: Sequence[int], window_s: float) -> tuple[int, int]:
    """Most events and most cost in any ``window_s`` sliding window (times sorted)."""
    best_n = best_cost = 0
    left = 0
    running = 0
    for right, at in enumerate(times):
        running += costs[right]
        while times[left] <= at - window_s:
            running -= costs[left]
            left += 1
        best_n = max(best_n, right - left + 1)
        best_cost = max(best_cost, running)
    return best_n, best_cost


def count_between(times: Sequence[float], low: float, high: float) -> int:
    """Events with ``low <= t < high`` (times sorted)."""
    return bisect.bisect_left(times, high) - bisect.bisect_left(times, low)


def steady_windows(
    times: Sequence[float], costs: Sequence[int], window_s: float = 60.0
) -> list[tuple[int, int]]:
    """(events, cost) per aligned window after the first, while demand lasted.

    Windows start at the first admission; window 0 is the start-up burst and is skipped.
    Window ``k`` counts only if it ended before the last admission, i.e. while a backlog
    was still waiting, so a draining tail does not read as a slow steady state.
    """
    if not times:
        return []
    t0, last = times[0], times[-1]
    out: list[tuple[int, int]] = []
    k = 1
    while t0 + (k + 1) * window_s <= last:
        lo = bisect.bisect_left(times, t0 + k * window_s)
        hi = bisect.bisect_left(times, t0 + (k + 1) * window_s)
        out.append((hi - lo, sum(costs[lo:hi])))
        k += 1
    return out


def stride_period(times: Sequence[float], stride: int) -> float | None:
    """Median seconds between admission ``i - stride`` and ``i``.

    With ``stride`` equal to the calls one window allows, a saturated strict sliding window
    gives exactly one window length; a slower system gives more. Needs ``len > stride``.
    """
    if stride < 1 or len(times) <= stride:
        return None
    return statistics.median(times[i] - times[i - stride] for i in range(stride, len(times)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by the nearest-rank method; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]
