"""The Celery app of the worker: ``celery -A worker.app worker`` / ``beat``.

Settings are read once, when this module is imported, and must be complete: the
Procfile's ``python -m jobs worker`` resolves them (and checks the services) before it
starts Celery here. A missing or bad setting ends the process with one line and exit
status 2; nothing embedded is ever started from here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import celery.apps.worker
from celery.signals import setup_logging, worker_ready, worker_shutting_down

from jobs import environment, logfmt
from jobs.connections import celery_app
from jobs.settings import ConfigError, Settings
from worker.runtime import get_runtime
from worker.schedule import build_schedule

try:
    settings = environment.require(Settings.from_env(), inference=True)
    schedule = build_schedule(settings)
except ConfigError as exc:
    sys.stderr.write(f"batch-infer: error: {exc}\n")
    sys.exit(2)

# Logfmt from the first line on: Celery warns (running as root, say) before it logs.
logfmt.configure(dyno=settings.dyno)
app = celery_app(settings, main="worker")
app.conf.update(
    include=["worker.tasks"],
    beat_schedule=schedule,
    beat_scheduler="worker.beat:Scheduler",
)


@setup_logging.connect
def _logfmt_everywhere(**_: Any) -> None:
    # Connecting here stops Celery from configuring logging itself: every line,
    # Celery's own included, goes through one logfmt handler.
    logfmt.configure(dyno=settings.dyno)


def _say(msg: str, f: Any = None) -> None:
    # Celery writes its shutdown notices ("worker: Warm shutdown") from the signal
    # handler with os.write, around logging; they become logfmt lines the same way.
    line = logfmt.format_fields(level="info", logger="celery.apps.worker", msg=msg.strip())
    os.write(2, (line + (f" dyno={settings.dyno}" if settings.dyno else "") + "\n").encode())


celery.apps.worker.safe_say = _say  # type: ignore[attr-defined]


@worker_ready.connect
def _start_dispatcher(sender: Any = None, **_: Any) -> None:
    runtime = get_runtime(settings)
    controller = getattr(sender, "controller", None)
    concurrency = getattr(controller, "concurrency", None) or settings.worker_concurrency
    runtime.log_startup(node=runtime.node, concurrency=int(concurrency))
    runtime.start_dispatcher()


@worker_shutting_down.connect
def _stop_waiting(**_: Any) -> None:
    # Jobs sleeping on the throttle or a backoff hand themselves back at once;
    # calls in flight may finish before Heroku's SIGKILL.
    get_runtime(settings).shutdown()
