"""The machine description and the markdown written to ``BENCHMARKS.md``."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.rows import SUMMARY_KEYS, Metric, Row

#: Table text for a value that does not apply or was not measured.
EMPTY = "-"


@dataclass(frozen=True)
class Machine:
    """Where the numbers were measured."""

    nproc: int
    memory_gb: float
    python: str
    cpu_model: str
    kernel: str
    #: Seconds one thread takes for :data:`SPEED_LOOP` additions in plain Python.
    loop_s: float

    @classmethod
    def current(cls) -> Machine:
        return cls(
            nproc=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
            memory_gb=round(_meminfo_kb("MemTotal") / 1024 / 1024, 1),
            python=platform.python_version(),
            cpu_model=_cpu_model(),
            kernel=platform.release(),
            loop_s=python_speed(),
        )


#: Additions timed by :func:`python_speed`.
SPEED_LOOP = 10_000_000


def python_speed() -> float:
    """The best of three timings of a plain Python loop, in seconds.

    Machines of the same description differ, and one machine's speed can change
    within a run: the same 2-core sandbox ran this loop in 0.38 s, and an hour
    later in 1.21 s. It is timed once, at the start, so it is a rough guide.
    """
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(SPEED_LOOP):
            total += i
        best = min(best, time.perf_counter() - t0)
    return round(best, 2)


def _meminfo_kb(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Hardware", "cpu model", "Model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def fmt(value: Metric) -> str:
    """A metric as table text: thousands separators, no trailing noise."""
    if value is None:
        return EMPTY
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _summary_cell(row: Row, key: str) -> str:
    m = row.metrics
    value = m.get(key)
    if value is None:
        return EMPTY
    limit_key = {
        "sim_max_requests_in_window": "limit_rpm",
        "sim_max_tokens_in_window": "limit_tpm",
    }.get(key)
    limit = m.get(limit_key) if limit_key else None
    if limit is not None:
        return f"{fmt(value)} / {fmt(limit)}"
    return fmt(value)


def _targets_cell(row: Row) -> str:
    if row.error is not None:
        return "**ERROR**"
    if not row.targets:
        return EMPTY
    met = sum(t.met for t in row.targets)
    missed = [t.label for t in row.targets if not t.met]
    text = f"{met}/{len(row.targets)} met"
    return text + ("; **missed**: " + "; ".join(missed) if missed else "")


def render(
    rows: Sequence[Row],
    *,
    machine: Machine,
    command: str,
    started: str,
    finished: str,
    quick: bool,
    load_before: str,
    load_after: str,
    servers: str,
    lanes: int = 1,
) -> str:
    """The whole ``BENCHMARKS.md`` text; ``lanes``: how many rows ran side by side."""
    out: list[str] = ["# Benchmarks", ""]
    mode = (
        "quick mode (limits x10, latencies /10, about two windows per row)"
        if quick
        else "full mode"
    )
    out += [
        f"Measured with {command}, {mode}, from {started} to {finished} (UTC).",
        "",
        "Every row runs the real stack: a fresh PostgreSQL database, a flushed Redis database, "
        "the simulator (`python -m devstack.simulator`, strict 60 s sliding window) in its own "
        "process and real Celery worker processes. Numbers come from the simulator's "
        "`/stats` (`sim_*`) and the Postgres attempts ledger (`ledger_*`, timelines); "
        "rerun the command above to reproduce them.",
        "",
        *(
            [
                f"Rows paced by the real limits ran up to {lanes} at a time, side by side, "
                "each with its own simulator, key, Redis database, PostgreSQL database and "
                "workers; `ran_alongside` in each row names the rows that overlapped it. The "
                "rows that measure the CPU's work (rpm10x, overhead) ran afterwards, one at "
                "a time, with the machine to themselves.",
                "",
            ]
            if lanes > 1
            else []
        ),
        "| nproc | memory | Python | CPU model | kernel | Python loop s | load avg before "
        "| load avg after |",
        "|---|---|---|---|---|---|---|---|",
        f"| {machine.nproc} | {machine.memory_gb} GB | {machine.python} | "
        f"{fmt(machine.cpu_model)} | {fmt(machine.kernel)} | {machine.loop_s} | "
        f"{load_before} | {load_after} |",
        "",
        f"Python loop s: one thread's best time for {SPEED_LOOP:,} additions in plain "
        "Python, at the start of the run. The CPU-bound rows (overhead, rpm10x) scale with "
        "the machine's speed, which can change during a run; the overhead row's plain "
        "httpx loop is a reference measured in that row.",
        "",
        f"Servers: {servers}.",
        "",
        "## Summary",
        "",
    ]
    headings = ["row", *(title for _, title in SUMMARY_KEYS), "targets"]
    out.append("| " + " | ".join(headings) + " |")
    out.append("|" + "---|" * len(headings))
    for row in rows:
        cells = [f"[{row.name}](#{row.name})"]
        cells += [_summary_cell(row, key) for key, _ in SUMMARY_KEYS]
        cells.append(_targets_cell(row))
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "Steady % of binding: admissions per 60 s window after the first, from the ledger, "
        "against the limit that binds (RPM, or TPM for the TPM rows); max req / tok per 60 s: "
        "the simulator's exact busiest window of admitted calls against the limit.",
        "",
        "In the rows below, throttle_redis_commands_per_admitted is the number of commands "
        "the throttle sent to Redis (one per script call) per call it admitted, summed over "
        "every worker process from the `event=throttle_stats` lines they log.",
        "",
        "## Rows",
    ]
    for row in rows:
        out += _details(row)
    return "\n".join(out) + "\n"


def _details(row: Row) -> list[str]:
    out = ["", f'<a id="{row.name}"></a>', "", f"### {row.name}: {row.title}", ""]
    if row.description:
        out += [row.description, ""]
    if row.error is not None:
        out += [f"**Error:** `{fmt(row.error)}`", ""]
    if row.targets:
        for t in row.targets:
            mark = "met" if t.met else "**MISSED**"
            out.append(f"- {mark}: {t.label} ({fmt(t.detail)})")
        out.append("")
    out += ["| metric | value |", "|---|---|"]
    for key, value in row.metrics.items():
        out.append(f"| {key} | {fmt(value)} |")
    out.append(f"| scenario_wall_s | {fmt(round(row.seconds, 1))} |")
    if row.notes:
        out.append("")
        out += [f"- {note}" for note in row.notes]
    return out
