"""Select scenarios, run them, keep going past failures, write the table.

Rows that only pace calls under the real limits run side by side in lanes
(:mod:`bench.lanes`); rows whose numbers depend on the CPU run afterwards, one at a time,
with the machine to themselves.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO
from urllib.parse import urlsplit

from bench import lanes
from bench import scenarios_budget as budgets
from bench import scenarios_neighbour as neighbour
from bench import scenarios_pool as pools
from bench import scenarios_rate as rate
from bench import scenarios_system as system
from bench.measure import processes
from bench.report import Machine, load_average, render
from bench.rows import Row
from bench.stack import DEFAULT_REDIS_DB, Run, Servers, with_redis_db

#: Rows run side by side in full mode; each lane owns the next Redis database. On a
#: 2-core machine five rows (RPM, restart, baseline) left the CPU 90 % idle, while eight
#: (with the priority and shared-key rows) kept it 91-98 % busy and calls arriving late
#: drew 429s after the restart rows' flush. Quick mode runs one at a time: at ten
#: times the limits, every row needs the CPU.
DEFAULT_LANES = 4


@dataclass(frozen=True)
class Scenario:
    """A named scenario.

    ``full_only`` ones are skipped in quick mode; ``solo`` ones measure the CPU's work
    and run with the machine to themselves, never in a lane.
    """

    name: str
    title: str
    func: Callable[[Run], Row]
    full_only: bool = False
    solo: bool = False


def _with(func: Callable[..., Row], *args: object) -> Callable[[Run], Row]:
    """``func(run, *args)`` as a scenario function."""

    def scenario(run: Run) -> Row:
        return func(run, *args)

    return scenario


def _both(
    name: str,
    title: str,
    func: Callable[..., Row],
    *args: object,
    quick: Sequence[int] = (3,),
    solo: bool = False,
    workers: Sequence[int] = (1, 3),
) -> tuple[Scenario, ...]:
    """The scenario with 1 worker process and with 3 (standing in for 3 dynos).

    Quick mode runs one row at a time, so it keeps only the variants in ``quick``. Rows
    about the provider or the load rather than the processes run with one (``workers``).
    """
    return tuple(
        Scenario(
            f"{name}-w{n}",
            f"{title}, {processes(n)}",
            _with(func, n, *args),
            full_only=n not in quick,
            solo=solo,
        )
        for n in workers
    )


def _one(name: str, title: str, func: Callable[..., Row], *args: object) -> tuple[Scenario, ...]:
    """A full-mode row with one worker process only."""
    return _both(name, title, func, *args, quick=(), workers=(1,))


SCENARIOS: tuple[Scenario, ...] = (
    *_both("rpm", "RPM-bound", rate.rpm, quick=(1, 3)),
    *_both("rpm10x", "RPM-bound at 10x limits", rate.rpm, 10, quick=(), solo=True),
    *_both("tpm-reserve", "TPM-bound, charge=reserve", rate.tpm, "reserve"),
    *_both("tpm-actual", "TPM-bound, charge=actual", rate.tpm, "actual"),
    *_both("long-calls", "Long calls (85-95 s)", rate.long_calls, quick=(1,), workers=(1,)),
    *_one("near-timeout", "Calls of 285-295 s, defaults", rate.near_timeout),
    *_one("near-timeout-wide", "Calls of 285-295 s, sized for them", rate.near_timeout, True),
    *_one("eta-behind", "Dry run behind a queued batch", rate.eta_behind),
    *_both("budget-batch", "A batch's budget raced for", budgets.budget_race, solo=True),
    *_both(
        "budget-daily", "A daily budget raced for", budgets.budget_race, True, quick=(), solo=True
    ),
    *_one("tpm-reserve-c3", "TPM-bound, charge=reserve, 3 chars/token", rate.tpm, "reserve", 3.0),
    *_one("tpm-actual-c3", "TPM-bound, charge=actual, 3 chars/token", rate.tpm, "actual", 3.0),
    *_one("tpm-reserve-cjk", "TPM-bound, charge=reserve, CJK", rate.tpm, "reserve", 1.5),
    *_one("tpm-actual-cjk", "TPM-bound, charge=actual, CJK", rate.tpm, "actual", 1.5),
    *_one("long-docs", "Long documents (~130,000 tokens)", rate.long_docs),
    # Full mode only: at ten times the limits a pool asks one process for 50-100 jobs/s.
    *_one("pool-2x150", "Two keys of 150 RPM against one", pools.two_keys),
    *_one("pool-mixed", "Three keys of 150, 200, 250 RPM", pools.mixed_keys),
    *_one("pool-401", "Two keys, one rejected mid-batch", pools.rejected_key),
    *_both("restart", "Start-up and Redis FLUSHDB mid-run", rate.restart),
    *_both("shared-key", "Another client on the same key", rate.shared_key),
    *_both("neighbour", "A retrying client on the same key", neighbour.neighbour),
    *_one("neighbour-noheaders", "The same, no rate-limit headers", neighbour.neighbour, False),
    *_both("priority", "Interactive jobs over a bulk backlog", system.priority),
    *_both("priority-first", "Interactive from the first window", system.priority_first),
    *_both("priority-reserve", "The same with an interactive reserve", system.priority_reserve),
    *_both(
        "overhead-throughput",
        "Limits lifted: jobs/s and CPU",
        system.overhead_throughput,
        quick=(1,),
        solo=True,
    ),
    Scenario("overhead-rss", "Worker RSS with 100 calls in flight", system.overhead_rss, solo=True),
    Scenario("overhead-submit", "Submitting a big batch file", system.overhead_submit, solo=True),
    Scenario("web-upload", "Uploading a big batch file to the web", system.web_upload, solo=True),
    Scenario("baseline-celery", "Celery rate_limit baseline", system.baseline),
)


def select(names: Sequence[str] | None, quick: bool) -> list[Scenario]:
    """Scenarios matching ``names`` (exact names or prefixes), in the standard order."""
    pool = [s for s in SCENARIOS if not (quick and s.full_only)]
    if not names:
        return pool
    unknown = [n for n in names if not any(s.name.startswith(n) for s in SCENARIOS)]
    if unknown:
        known = ", ".join(s.name for s in SCENARIOS)
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {known}")
    picked = [s for s in pool if any(s.name == n or s.name.startswith(n) for n in names)]
    if not picked:
        raise SystemExit("every selected scenario runs in full mode only; drop --quick")
    return picked


def run_one(scenario: Scenario, run: Run) -> Row:
    """Run a scenario; a failure becomes a row with the error, never an exception."""
    t0 = time.perf_counter()
    try:
        row = scenario.func(run)
    except Exception as exc:  # noqa: BLE001 - one failed scenario must not stop the run
        row = Row(scenario.name, scenario.title)
        row.error = f"{type(exc).__name__}: {exc}"
        (run.logs / f"{scenario.name}-error.txt").write_text(traceback.format_exc())
    row.seconds = time.perf_counter() - t0
    scan_worker_logs(row, run.logs, scenario.name)
    return row


def _is_deadlock(line: str) -> bool:
    # Once per incident: the traceback's last line, or a logged event (the dispatcher's).
    return "DeadlockDetected" in line and (
        line.startswith("sqlalchemy.exc.") or line.startswith("event=")
    )


#: Worker log lines worth counting in every row: (metric key, line predicate).
LOG_CHECKS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("worker_log_tracebacks", lambda line: line.startswith("Traceback (most recent call last)")),
    ("worker_log_task_exceptions", lambda line: "raised unexpected:" in line),
    ("worker_log_unrecoverable", lambda line: "Unrecoverable error" in line),
    ("worker_log_deadlocks", _is_deadlock),
)


def scan_worker_logs(row: Row, logs: Path, name: str) -> None:
    """Count tracebacks, task exceptions, deadlocks and fatal errors in the row's worker logs."""
    paths = sorted(logs.glob(f"{name}-worker*.log"))
    if not paths:
        return
    texts = [p.read_text(errors="replace") for p in paths]
    for key, check in LOG_CHECKS:
        row.metrics[key] = sum(check(line) for text in texts for line in text.splitlines())
    _throttle_round_trips(row, texts)
    for text in texts:
        line = next((ln for ln in text.splitlines() if "Unrecoverable error" in ln), None)
        if line is not None:
            row.notes.append(f"A worker logged: {line.strip()[:300]}")
            break


def _throttle_round_trips(row: Row, texts: Sequence[str]) -> None:
    """Redis commands the throttle sent per admitted call, from each process's last count.

    Workers log cumulative ``event=throttle_stats`` lines (:mod:`worker.runtime`), one
    per bucket (a pool's attachment); a restarted worker writes to the same file under
    a new pid.
    """
    last: dict[tuple[int, str, str, str], tuple[int, int]] = {}
    for n, text in enumerate(texts):
        for line in text.splitlines():
            if line.startswith("event=throttle_stats "):
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                key = (
                    n,
                    fields.get("pid", ""),
                    fields.get("model", ""),
                    fields.get("attachment", ""),
                )
                last[key] = (int(fields["admitted"]), int(fields["redis_round_trips"]))
    admitted = sum(a for a, _ in last.values())
    trips = sum(t for _, t in last.values())
    if admitted:
        row.metrics["throttle_admitted"] = admitted
        row.metrics["throttle_redis_commands"] = trips
        row.metrics["throttle_redis_commands_per_admitted"] = round(trips / admitted, 2)


def _command(argv: Sequence[str]) -> str:
    """The command that produced the file, as markdown (``make bench`` when run by make)."""
    direct = "python -m bench" + "".join(" " + shlex.quote(a) for a in argv)
    if os.environ.get("MAKELEVEL"):
        quick = " QUICK=1" if "--quick" in argv else ""
        return f"`make bench{quick}`, which ran `{direct}`"
    return f"`{direct}`"


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the whole stack against the simulator; write BENCHMARKS.md.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="limits x10, latencies /10, about two windows a row"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="scenario names or prefixes (e.g. rpm)"
    )
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write")
    parser.add_argument(
        "--redis-db",
        type=int,
        default=int(os.environ.get("BENCH_REDIS_DB", DEFAULT_REDIS_DB)),
        help=f"first Redis database the run owns and flushes; lane i uses the first + i "
        f"(default {DEFAULT_REDIS_DB})",
    )
    parser.add_argument(
        "--lanes",
        type=int,
        help=f"rows paced by the real limits run this many at once (default {DEFAULT_LANES}, "
        "1 in quick mode: one after another)",
    )
    parser.add_argument(
        "--logs", help="directory for worker and simulator logs (default: VAR_DIR/bench/<time>)"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    # A lane's own process (bench.lanes): run one row, write it as JSON, write no table.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lanes is None:
        args.lanes = 1 if args.quick else DEFAULT_LANES
    if args.lanes < 1:
        parser.error("--lanes must be 1 or more")
    return args


def _exclusive(redis_url: str, var_dir: Path) -> TextIO:
    """Hold a lock for the benchmark's Redis database while this run lasts.

    Two runs on one Redis database would flush each other's queues and throttle state and
    run each other's jobs, so a second run fails at once instead.
    """
    parts = urlsplit(redis_url)
    lock = var_dir / f".lock-{parts.hostname}-{parts.port}-{parts.path.strip('/') or 0}"
    handle = open(lock, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SystemExit(
            f"bench: {holder} is already benchmarking on {_host(redis_url)} database "
            f"{parts.path.strip('/')}; wait for it or pass --redis-db N"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def _stop_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a closed CI job) into an exit that still closes the stack."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _child(args: argparse.Namespace) -> int:
    """Run one row in this process (a lane) and write it to ``--row-json``."""
    scenario = next((s for s in SCENARIOS if s.name == args.child), None)
    if scenario is None or not args.row_json or not args.logs:
        raise SystemExit(f"bench: --child needs a known row, --row-json and --logs: {args}")
    _stop_on_sigterm()
    run = Run(servers=Servers.resolve(args.redis_db), logs=Path(args.logs), quick=args.quick)
    row = run_one(scenario, run)
    Path(args.row_json).write_text(json.dumps(row.as_dict()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(args_list)
    if args.list:
        for s in SCENARIOS:
            flags = ("  (full mode only)" if s.full_only else "") + ("  (alone)" if s.solo else "")
            print(f"{s.name:<24} {s.title}{flags}")
        return 0
    if args.child:
        return _child(args)
    selected = select(args.only, args.quick)
    var_bench = Path(os.environ.get("VAR_DIR") or "var") / "bench"
    var_bench.mkdir(parents=True, exist_ok=True)
    servers = Servers.resolve(args.redis_db)
    shared = [s for s in selected if not s.solo]
    dbs = [args.redis_db + i for i in range(min(args.lanes, len(shared)) or 1)]
    locks = [_exclusive(with_redis_db(servers.redis_url, n), var_bench) for n in dbs]
    _stop_on_sigterm()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = (Path(args.logs) if args.logs else var_bench / stamp).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    run = Run(servers=servers, logs=logs, quick=args.quick)
    out_path = Path(args.out)
    if not out_path.is_absolute():
        out_path = Path.cwd() / out_path
    machine = Machine.current()
    started, load_before = _utc_now(), load_average()
    databases = f"database {dbs[0]}" if len(dbs) == 1 else f"databases {dbs[0]} to {dbs[-1]}"
    server_text = (
        f"PostgreSQL {_host(servers.postgres_url)}, Redis {_host(servers.redis_url)} {databases}"
    )
    print(f"bench: {len(selected)} scenario(s); logs in {logs}", flush=True)
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    rows: list[Row] = []

    def done(row: Row) -> None:
        rows.append(row)
        rows.sort(key=lambda r: order.get(r.name, len(order)))
        verdict = row.error or (
            "all targets met" if not row.missed else f"missed: {[t.label for t in row.missed]}"
        )
        print(f"bench: {row.name} done in {row.seconds:.0f} s: {verdict}", flush=True)
        text = render(
            rows,
            machine=machine,
            command=_command(args_list),
            started=started,
            finished=_utc_now(),
            quick=args.quick,
            load_before=load_before,
            load_after=load_average(),
            servers=server_text,
            lanes=len(dbs) if len(shared) > 1 else 1,
        )
        out_path.write_text(text)

    if len(shared) > 1 and len(dbs) > 1:
        lanes.run_side_by_side(
            [(s.name, s.title) for s in shared],
            redis_dbs=dbs,
            logs=logs,
            quick=args.quick,
            on_row=done,
        )
        alone = [s for s in selected if s.solo]
    else:
        alone = selected
    for scenario in alone:
        print(f"bench: {scenario.name} ...", flush=True)
        done(run_one(scenario, run))
    print(f"bench: wrote {out_path}", flush=True)
    for lock in locks:
        lock.close()
    return 1 if any(r.error for r in rows) else 0


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"
