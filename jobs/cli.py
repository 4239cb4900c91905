"""Command line: ``python -m jobs`` or ``batch-infer``.

Every user error (unknown id, bad argument, invalid file, bad setting) prints
one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from jobs import api, migrate, reports, retention, services
from jobs.batchfile import write_output
from jobs.constants import QUEUE_BULK, QUEUE_CONTROL, QUEUE_INTERACTIVE
from jobs.settings import ConfigError, Settings
from jobs.validation import ValidationError

USAGE_ERROR = 2


class UsageError(Exception):
    """A one-line error for the user."""


def _batch_id(text: str) -> int:
    try:
        value = int(text.removeprefix("batch-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a batch id: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a batch id: {text!r}")
    return value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of days >= 0: {text!r}")
    return value


def progress_line(p: api.BatchProgress, width: int = 30) -> str:
    fraction = p.done / p.total if p.total else 1.0
    filled = round(fraction * width)
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"[{bar}] {p.done}/{p.total} {fraction:6.1%}  "
        f"ok {p.succeeded}  failed {p.failed}  running {p.running}  queued {p.queued}"
    )


class ProgressPrinter:
    """A progress bar on a terminal; a line every few seconds elsewhere (logs)."""

    def __init__(self, stream: TextIO = sys.stderr, every_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._last_line = ""

    def __call__(self, progress: api.BatchProgress) -> None:
        line = progress_line(progress)
        if self.tty:
            self.stream.write("\r" + line)
            if progress.finished and progress.running == 0:
                self.stream.write("\n")
            self.stream.flush()
            return
        now = dt.datetime.now().timestamp()
        final = progress.finished and progress.running == 0
        if (now - self._last >= self.every_s and line != self._last_line) or final:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last, self._last_line = now, line


def _progress_dict(p: api.BatchProgress) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "source": p.source,
        "status": p.status,
        "total": p.total,
        "queued": p.queued,
        "running": p.running,
        "succeeded": p.succeeded,
        "failed": p.failed,
        "cancelled": p.cancelled,
    }


def cmd_submit(args: argparse.Namespace, out: TextIO) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such file: {args.file}")
    batch = api.submit_file(path, name=args.name)
    out.write(f"batch {batch.id} submitted: {batch.progress().total} jobs\n")
    out.flush()
    if args.wait:
        final = batch.wait(on_progress=ProgressPrinter())
        out.write(progress_line(final) + "\n")
        return 0 if final.failed == 0 else 1
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    batch = api.get_batch(args.batch)
    progress = batch.progress()
    paused = None if progress.finished else batch.calls_paused()
    if args.json:
        json.dump(_progress_dict(progress) | {"paused": paused}, out)
        out.write("\n")
    else:
        out.write(f"batch {progress.id} ({progress.name}, {progress.source}): {progress.status}\n")
        out.write(progress_line(progress) + "\n")
        if paused:
            out.write(paused + "\n")
    return 0


def cmd_results(args: argparse.Namespace, out: TextIO) -> int:
    batch = api.get_batch(args.batch)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            count = _write_lines(batch.results(), fh)
        out.write(f"wrote {count} result lines to {args.output}\n")
    else:
        _write_lines(batch.results(), out)
    return 0


def _write_lines(lines: Iterable[dict[str, Any]], stream: TextIO) -> int:
    return write_output(lines, stream)


def cmd_usage(args: argparse.Namespace, out: TextIO) -> int:
    ctx = api.context()
    if args.batch is not None:
        api.get_batch(args.batch)
    rows = reports.usage(ctx.database_url, since=args.since, batch_id=args.batch)
    if args.json:
        json.dump([row.as_dict() for row in rows], out)
        out.write("\n")
        return 0
    header = f"{'day':<10}  {'batch':>7}  {'model':<14} {'calls':>7} {'ok':>7} "
    header += f"{'prompt':>12} {'completion':>12} {'total':>12}\n"
    out.write(header)
    for row in rows:
        batch = str(row.batch_id) if row.batch_id is not None else "-"
        out.write(
            f"{row.day.isoformat():<10}  {batch:>7}  {row.model:<14} {row.calls:>7} "
            f"{row.ok_calls:>7} {row.prompt_tokens:>12} {row.completion_tokens:>12} "
            f"{row.total_tokens:>12}\n"
        )
    total = sum(row.total_tokens for row in rows)
    out.write(f"{len(rows)} rows, {sum(r.calls for r in rows)} calls, {total} tokens\n")
    return 0


def cmd_purge(args: argparse.Namespace, out: TextIO) -> int:
    ctx = api.context()
    days = args.older_than_days
    if days is None:
        days = ctx.settings.result_retention_days
        if days == 0:
            out.write(
                "nothing purged: RESULT_RETENTION_DAYS=0 keeps results forever "
                "(pass --older-than-days N to purge anyway)\n"
            )
            return 0
    report = retention.purge(ctx.settings, older_than=days, dry_run=args.dry_run)
    verb = "would purge" if report.dry_run else "purged"
    cutoff = report.cutoff.astimezone(dt.UTC)
    out.write(
        f"{verb} {report.jobs} jobs finished more than {days} days ago "
        f"(before {cutoff:%Y-%m-%d %H:%M:%S} UTC)\n"
    )
    return 0


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    count = api.get_batch(args.batch).cancel()
    out.write(f"batch {args.batch}: cancelled {count} queued jobs\n")
    return 0


def cmd_retry(args: argparse.Namespace, out: TextIO) -> int:
    count = api.get_batch(args.batch).retry()
    out.write(f"batch {args.batch}: re-queued {count} failed jobs\n")
    return 0


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    ctx_settings = services.resolve(Settings.from_env())
    assert ctx_settings.database_url is not None
    migrate.upgrade(ctx_settings.database_url)
    out.write("database schema is up to date\n")
    return 0


def worker_argv(settings: Settings, *, concurrency: int | None = None) -> list[str]:
    """The Celery command line of a worker (also what the Procfile runs)."""
    queues = ",".join((QUEUE_INTERACTIVE, QUEUE_BULK, QUEUE_CONTROL))
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        # Threads: each job spends its life waiting on the network or the
        # throttle; 100 threads cost a few MB, not 100 processes.
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency or settings.worker_concurrency),
        "--queues",
        queues,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def _exec_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # Child processes join the servers this process resolved.
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    if settings.inference_url:
        env["INFERENCE_URL"] = settings.inference_url
        env["INFERENCE_KEY"] = settings.inference_key
    return env


def cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    settings = services.resolve(Settings.from_env())
    argv = worker_argv(settings, concurrency=args.concurrency)
    os.execve(sys.executable, argv, _exec_env(settings))  # noqa: S606 - replaces this process


def cmd_beat(args: argparse.Namespace, out: TextIO) -> int:
    settings = services.resolve(Settings.from_env())
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO"]
    os.execve(sys.executable, argv, _exec_env(settings))  # noqa: S606 - replaces this process


def cmd_services(args: argparse.Namespace, out: TextIO) -> int:
    var_dir = Settings.from_env().var_dir
    if args.action == "stop":
        stopped = services.stop(var_dir)
        out.write(f"stopped: {', '.join(stopped) or 'nothing was running'}\n")
    else:
        for name, url in sorted(services.running(var_dir).items()):
            out.write(f"{name}: {url}\n")
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from jobs.demo import run_demo

    return run_demo(requests=args.requests, out=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-infer",
        description="Batch chat completions on Heroku Managed Inference.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="validate and queue an OpenAI Batch JSONL file")
    p.add_argument("file")
    p.add_argument("--name", help="batch name (default: the file name)")
    p.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="counts of a batch's jobs by status")
    p.add_argument("batch", type=_batch_id)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("results", help="write OpenAI Batch output lines")
    p.add_argument("batch", type=_batch_id)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("usage", help="calls and tokens by day, batch and model")
    p.add_argument("--since", type=_date, help="first UTC day, YYYY-MM-DD")
    p.add_argument("--batch", type=_batch_id)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("purge", help="delete the bodies of jobs finished long ago")
    p.add_argument(
        "--older-than-days",
        type=_days,
        metavar="N",
        help="days since a job finished (default RESULT_RETENTION_DAYS)",
    )
    p.add_argument("--dry-run", action="store_true", help="count the jobs, change nothing")
    p.set_defaults(func=cmd_purge)

    for name, func, text in (
        ("cancel", cmd_cancel, "cancel a batch's queued jobs"),
        ("retry", cmd_retry, "re-queue a batch's failed jobs"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("batch", type=_batch_id)
        p.set_defaults(func=func)

    p = sub.add_parser("worker", help="run a Celery worker on the current settings")
    p.add_argument("--concurrency", type=int, help="threads (default WORKER_CONCURRENCY)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="run the redbeat scheduler")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("migrate", help="bring the database schema up to date")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="run a demo batch end to end on embedded defaults")
    p.add_argument("--requests", type=int, default=240, help="demo batch size (default 240)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("services", help="embedded PostgreSQL/Redis/simulator under VAR_DIR")
    p.add_argument("action", choices=("status", "stop"))
    p.set_defaults(func=cmd_services)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stream = out or sys.stdout
    try:
        result: int = args.func(args, stream)
    except (UsageError, api.NotFoundError, ConfigError, ValidationError) as exc:
        sys.stderr.write(f"batch-infer: error: {exc}\n")
        return USAGE_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("batch-infer: interrupted\n")
        return 130
    return result
