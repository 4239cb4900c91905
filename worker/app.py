"""The Celery app of the worker: ``celery -A worker.app worker`` / ``beat``.

Settings are read once, when this module is imported; with DATABASE_URL or
REDIS_URL unset, the embedded servers under VAR_DIR are started or joined.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from jobs import logfmt
from jobs.connections import celery_app
from jobs.services import resolve
from jobs.settings import Settings
from worker.schedule import build_schedule

settings = resolve(Settings.from_env())
app = celery_app(settings, main="worker")
app.conf.update(
    include=["worker.tasks"],
    beat_schedule=build_schedule(settings),
    beat_scheduler="worker.beat:Scheduler",
)
logfmt.configure()


@worker_ready.connect
def _start_dispatcher(**_: Any) -> None:
    from worker.runtime import get_runtime

    get_runtime(settings).start_dispatcher()


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    logfmt.configure()


@worker_shutting_down.connect
def _stop_waiting(**_: Any) -> None:
    # Jobs sleeping on the throttle or a backoff hand themselves back at once;
    # calls in flight may finish before Heroku's SIGKILL.
    from worker.runtime import get_runtime

    get_runtime(settings).shutdown()
