"""Command line: ``python -m jobs`` or ``batch-infer`` (what the Procfile runs, too).

:func:`main` follows one job's path into a command:

1. parse the arguments (argparse prints a bad one as one line, exit 2);
2. read the settings once and resolve the services (:func:`jobs.environment.resolve`):
   on a dyno every variable must be set, off a dyno the dev stack fills what is unset;
3. check the services the command needs (:data:`PLANS`): PostgreSQL reachable with its
   schema at head, Redis reachable. ``worker`` and ``beat`` keep trying for
   ``SERVICE_WAIT_SECONDS``, one log line per try;
4. run the command with those settings.

Every fault of the user's or of the environment (bad argument, unknown id, invalid
file, bad or missing setting, unreachable service, unmigrated database, unwritable
output) prints one line on stderr, naming what to fix, and exits 2; no traceback.
A reader that closes the pipe early (``| head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import redis
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from jobs import api, dryrun, environment, migrate, reports, retention, shapes
from jobs.batchfile import write_output
from jobs.budget import Budget
from jobs.environment import Needs, ServiceError
from jobs.handles import Which
from jobs.logfmt import configure as configure_logging
from jobs.logfmt import log_event
from jobs.pricing import NO_PRICE, dollars, usage_text
from jobs.progress import ProgressPrinter, progress_line
from jobs.settings import ConfigError, Settings
from jobs.validation import ValidationError

USAGE_ERROR = 2
#: Exit status after Ctrl-C.
INTERRUPTED = 130
#: Most batches ``list`` shows.
MAX_LIST = 1000
#: What ``submit -`` reads.
STDIN = "/dev/stdin"


class UsageError(Exception):
    """A one-line error for the user."""


def _batch_id(text: str) -> int:
    """``batch_12`` (the API's ids), or ``12``."""
    value = shapes.parse_batch_id(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not a batch id: {text!r}")
    return value


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
        raise argparse.ArgumentTypeError(f"not a number from 1 to {MAX_LIST}: {text!r}")
    return int(text)


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
    if args.dry_run:
        return _dry_run(args, out)
    budget = Budget.parse(
        args.budget_tokens, args.budget_usd, names=("--budget-tokens", "--budget-usd")
    )
    if args.file == "-":
        # Standard input: how a local file reaches a one-off dyno (`heroku run ... < f`).
        batch = api.submit_file(
            STDIN,
            name=args.name or "stdin",
            completion_window=args.completion_window,
            budget=budget,
        )
    else:
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"no such file: {args.file}")
        batch = api.submit_file(
            path, name=args.name, completion_window=args.completion_window, budget=budget
        )
    out.write(f"batch {batch.id} submitted: {batch.progress().total} jobs\n")
    out.flush()
    if not args.wait:
        return 0
    printer = ProgressPrinter(pace=lambda: _pace_text(batch.id))
    try:
        final = batch.wait(on_progress=printer, on_notice=printer.notice)
    except KeyboardInterrupt:
        printer.notice(
            f"stopped waiting; batch {batch.id} goes on: follow it with "
            f"`python -m jobs status {batch.id}`, stop it with `python -m jobs cancel {batch.id}`"
        )
        return INTERRUPTED
    out.write(progress_line(final) + "\n")
    return 0 if final.failed == 0 and final.cancelled == 0 else 1


def _pace_text(batch_id: int) -> str:
    """The batch's rate and expected end for a progress line; nothing while the database
    is away (the wait rides the outage out and says so)."""
    try:
        standing = api.get_batch(batch_id).budget()
        if standing.paused_reason is not None:
            return f"paused: {standing.paused_reason}"
        return dryrun.pace(api.context().settings, batch_id).describe()
    except SQLAlchemyError:
        return ""


def _dry_run(args: argparse.Namespace, out: TextIO) -> int:
    if args.file != "-" and not Path(args.file).is_file():
        raise UsageError(f"no such file: {args.file}")
    found = api.estimate_file(STDIN if args.file == "-" else Path(args.file))
    if args.json:
        json.dump(found.as_dict(), out)
        out.write("\n")
    else:
        out.write("\n".join(dryrun.describe(found)) + "\n")
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    batch = api.get_batch(args.batch)
    progress = batch.progress()
    paused = aside = None
    if not progress.finished:
        try:
            paused = batch.calls_paused()
            aside = None if paused else batch.keys_set_aside()
        except redis.RedisError:
            paused = "(Redis is unreachable: whether calls are paused is unknown)"
    ctx = api.context()
    spent = shapes.batch_usage(ctx.database_url, [progress.id], ctx.settings.price_for)
    usage, usd = spent[progress.id]["usage"], spent[progress.id]["usd"]
    split = shapes.attachment_split(spent[progress.id]["attachments"])
    standing = batch.budget()
    paused = standing.paused_reason or paused
    pace = None if progress.finished or paused else dryrun.pace(ctx.settings, progress.id)
    if args.json:
        extra = {"paused": paused, "set_aside": aside, "usage": usage, "usage_usd": usd}
        extra["attachments"] = {
            alias: {"calls": calls, "tokens": tokens}
            for alias, (calls, tokens) in spent[progress.id]["attachments"].items()
        }
        extra["budget"] = standing.as_dict() if standing.budget else None
        if pace is not None:
            extra["pace"] = {"per_minute": pace.per_minute, "finish_s": pace.finish_s}
        json.dump(_progress_dict(progress) | extra, out)
        out.write("\n")
    else:
        out.write(f"batch {progress.id} ({progress.name}, {progress.source}): {progress.status}\n")
        out.write(progress_line(progress) + "\n")
        prompt, completion = usage["input_tokens"], usage["output_tokens"]
        out.write(f"usage: {usage_text(prompt, completion, usd)}\n")
        if split is not None:
            out.write(f"by attachment: {split}\n")
        if standing.budget:
            out.write(standing.describe() + "\n")
        if pace is not None:
            out.write(f"pace: {pace.describe()}\n")
        if paused:
            out.write(f"paused: {paused}\n" if standing.paused_reason else paused + "\n")
        if aside:
            out.write(aside + "\n")
    return 0


def cmd_results(args: argparse.Namespace, out: TextIO) -> int:
    batch = api.get_batch(args.batch)
    which: Which = "all" if args.all else "errors" if args.errors else "output"
    if args.output:
        count = _write_file(Path(args.output), batch.results(which))
        out.write(f"wrote {count} result lines to {args.output}\n")
    else:
        write_output(batch.results(which), out)
    return 0


def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    rows = api.recent_batches(limit=args.limit)
    if args.json:
        json.dump([_progress_dict(p) for p in rows], out)
        out.write("\n")
        return 0
    out.write(f"{'batch':<14} {'status':<11} {'total':>7} {'ok':>7} {'failed':>7}  name\n")
    for p in rows:
        failed = p.failed + p.cancelled
        out.write(
            f"{shapes.batch_public_id(p.id):<14} {p.status:<11} {p.total:>7} {p.succeeded:>7} "
            f"{failed:>7}  {p.name}\n"
        )
    return 0


def _write_file(path: Path, lines: Iterable[dict[str, Any]]) -> int:
    """Write ``lines`` to a temporary file beside ``path``, renamed over it once whole.

    A path that cannot be written is a one-line error, and a failure half-way leaves no
    half-written file behind.
    """
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            count = write_output(lines, fh)
        os.replace(temp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        Path(temp).unlink(missing_ok=True)
    return count


def cmd_usage(args: argparse.Namespace, out: TextIO) -> int:
    ctx = api.context()
    if args.batch is not None:
        api.get_batch(args.batch)
    rows = reports.usage(
        ctx.database_url, since=args.since, batch_id=args.batch, price_for=ctx.settings.price_for
    )
    if args.json:
        json.dump([row.as_dict() for row in rows], out)
        out.write("\n")
        return 0
    header = f"{'day':<10}  {'batch':>7}  {'model':<14} {'attachment':<12} {'calls':>7} {'ok':>7} "
    header += f"{'prompt':>12} {'completion':>12} {'total':>12} {'usd':>12}\n"
    out.write(header)
    for row in rows:
        batch = str(row.batch_id) if row.batch_id is not None else "-"
        out.write(
            f"{row.day.isoformat():<10}  {batch:>7}  {row.model:<14} "
            f"{row.attachment or '-':<12} {row.calls:>7} "
            f"{row.ok_calls:>7} {row.prompt_tokens:>12} {row.completion_tokens:>12} "
            f"{row.total_tokens:>12} {dollars(row.usd):>12}\n"
        )
    total = sum(row.total_tokens for row in rows)
    summary = f"{len(rows)} rows, {sum(r.calls for r in rows)} calls, {total} tokens"
    unpriced = sorted({row.model for row in rows if row.usd is None})
    if rows and not unpriced:
        summary += f", {dollars(sum(row.usd or 0.0 for row in rows))}"
    out.write(summary + "\n")
    if unpriced:
        out.write(f"{', '.join(unpriced)}: {NO_PRICE}\n")
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
    batch = api.get_batch(args.batch)
    count = batch.cancel()
    after = batch.progress()
    if after.status == "cancelling":
        tail = f"cancelling until its {after.running} calls in flight end"
    else:
        tail = after.status
    out.write(f"batch {args.batch}: stopped {count} jobs not yet sent; {tail}\n")
    return 0


def cmd_budget(args: argparse.Namespace, out: TextIO) -> int:
    batch = api.get_batch(args.batch)
    if args.tokens is None and args.usd is None:
        out.write(batch.budget().describe() + "\n")
        return 0
    now = batch.budget().budget
    given = Budget.parse(args.tokens, args.usd, names=("--tokens", "--usd"))
    tokens = now.tokens if args.tokens is None else given.tokens
    usd = now.usd if args.usd is None else given.usd
    batch.set_budget(Budget(tokens, usd))
    out.write(f"batch {args.batch}: {batch.budget().describe()}; its calls go on\n")
    return 0


def cmd_retry(args: argparse.Namespace, out: TextIO) -> int:
    count = api.get_batch(args.batch).retry()
    out.write(f"batch {args.batch}: re-queued {count} failed jobs\n")
    return 0


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    settings = api.context().settings
    assert settings.database_url is not None
    migrate.upgrade(settings.database_url)
    out.write("database schema is up to date\n")
    return 0


def _exec(argv: list[str]) -> int:
    settings = api.context().settings
    os.execve(argv[0], argv, environment.child_env(settings))  # noqa: S606 - replaces this process


def cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    return _exec(environment.worker_argv(api.context().settings, concurrency=args.concurrency))


def cmd_beat(args: argparse.Namespace, out: TextIO) -> int:
    return _exec(environment.beat_argv())


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument told in one line (its usage stays in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"batch-infer: error: {self.prog}: {message} (see --help)\n")


def _add_submit(sub: Any) -> None:
    p = sub.add_parser("submit", help="validate and queue an OpenAI Batch JSONL file")
    p.add_argument("file", help="the JSONL file, or - for standard input")
    p.add_argument("--name", help="batch name (default: the file name, or stdin)")
    p.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and price the file, and say when it would end; store nothing",
    )
    p.add_argument("--json", action="store_true", help="the dry run's figures as JSON")
    p.add_argument(
        "--completion-window",
        metavar="DURATION",
        help="expire the batch if it has not ended within this (24h, 30m...; default: none)",
    )
    p.add_argument("--budget-tokens", metavar="N", help="never spend more tokens than this")
    p.add_argument("--budget-usd", metavar="X", help="never spend more US dollars than this")
    p.set_defaults(func=cmd_submit)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batch-infer",
        description="Batch chat completions on Heroku Managed Inference.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_submit(sub)

    p = sub.add_parser("budget", help="show or change a batch's budget (a raise resumes it)")
    p.add_argument("batch", type=_batch_id)
    p.add_argument("--tokens", metavar="N", help="the new token budget")
    p.add_argument("--usd", metavar="X", help="the new budget in US dollars")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("status", help="counts of a batch's jobs by status")
    p.add_argument("batch", type=_batch_id)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("results", help="write OpenAI Batch output lines")
    p.add_argument("batch", type=_batch_id)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--errors", action="store_true", help="the error file's lines instead")
    which.add_argument("--all", action="store_true", help="both files' lines, in input order")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("list", help="recent batches, newest first")
    p.add_argument("--limit", type=_limit, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("usage", help="calls and tokens by day, batch, model and attachment")
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

    return parser


@dataclass(frozen=True)
class Plan:
    """What a command needs before it runs: services checked, a model, patience."""

    needs: Needs = field(default_factory=Needs)
    #: Calls the model (the worker): INFERENCE_URL is resolved (the simulator off a dyno).
    inference: bool = False
    #: Keeps trying unreachable services for SERVICE_WAIT_SECONDS (a process that starts).
    patient: bool = False


DATABASE_ONLY = Needs(redis=False)
#: Per command; a command not listed needs the database (schema at head) and Redis.
PLANS: dict[str, Plan] = {
    "status": Plan(DATABASE_ONLY),
    "results": Plan(DATABASE_ONLY),
    "list": Plan(DATABASE_ONLY),
    "usage": Plan(DATABASE_ONLY),
    "purge": Plan(DATABASE_ONLY),
    "migrate": Plan(Needs(schema=False, redis=False)),
    "worker": Plan(inference=True, patient=True),
    "beat": Plan(patient=True),
}


def _log_retry(error: ServiceError, seconds_left: float) -> None:
    log_event("service_wait", error=str(error), gives_up_in_s=round(seconds_left))


def prepare(command: str) -> Settings:
    """Steps 2 and 3: the resolved settings, with the services ``command`` needs checked."""
    plan = PLANS.get(command, Plan())
    settings = environment.resolve(Settings.from_env(), inference=plan.inference)
    if plan.patient:
        configure_logging(dyno=settings.dyno)
        environment.wait_for_services(settings, plan.needs, on_retry=_log_retry)
    else:
        environment.check_services(settings, plan.needs)
    return api.configure(settings)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _quiet_stdout() -> None:
    """The reader went away: point stdout at /dev/null so that exit's flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


USER_FAULTS = (UsageError, api.NotFoundError, ConfigError, ValidationError, ServiceError)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stream = out or sys.stdout
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        prepare(args.command)
        return func(args, stream)
    except USER_FAULTS as exc:
        sys.stderr.write(f"batch-infer: error: {_one_line(exc)}\n")
        return USAGE_ERROR
    except (OperationalError, InterfaceError) as exc:
        # Lost after the start-up check: say which service, never the URL's password.
        reason = _one_line(exc.orig) if exc.orig is not None else type(exc).__name__
        sys.stderr.write(f"batch-infer: error: lost PostgreSQL (DATABASE_URL): {reason}\n")
        return USAGE_ERROR
    except redis.ConnectionError as exc:
        sys.stderr.write(f"batch-infer: error: lost Redis (REDIS_URL): {_one_line(exc)}\n")
        return USAGE_ERROR
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("batch-infer: interrupted\n")
        return INTERRUPTED
