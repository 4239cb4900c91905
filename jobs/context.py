"""The settings a process works with, chosen once, and what publishing needs with them.

:func:`configure` sets the default (from the environment, or the dev stack when asked);
:func:`context` returns the :class:`Context` of any settings, built once per process;
:func:`publish` hands committed jobs to the dispatcher at once, best effort.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from celery import Celery

from jobs import environment
from jobs.connections import celery_app
from jobs.dispatch import dispatch
from jobs.logfmt import log_event
from jobs.settings import Settings


@dataclass(frozen=True)
class Context:
    """Resolved settings plus the Celery app used to publish."""

    settings: Settings
    app: Celery

    @property
    def database_url(self) -> str:
        assert self.settings.database_url is not None
        return self.settings.database_url


_contexts: dict[Settings, Context] = {}
_context_lock = threading.Lock()
_default: Settings | None = None


def configure(settings: Settings | None = None, *, dev_stack: bool = False) -> Settings:
    """Choose the settings that every call without ``settings=`` uses from now on.

    ``settings`` defaults to the environment, read once here. ``dev_stack=True`` (a
    developer's machine only) starts or joins the dev stack's embedded PostgreSQL and
    Redis for whatever DATABASE_URL or REDIS_URL leaves unset; on a dyno it refuses.
    Without this call, the first call reads the environment and requires both URLs.
    Raises :class:`~jobs.settings.ConfigError` naming the variable at fault.
    """
    global _default  # noqa: PLW0603 - one default per process, set explicitly
    chosen = Settings.from_env() if settings is None else settings
    if dev_stack:
        chosen = environment.resolve(chosen, inference=False)
    chosen = environment.require(chosen)
    with _context_lock:
        _default = chosen
    return chosen


def context(settings: Settings | None = None) -> Context:
    """The context for ``settings`` (default: :func:`configure`'s), built once per process."""
    if settings is None:
        settings = _default if _default is not None else configure()
    else:
        environment.require(settings)
    with _context_lock:
        ctx = _contexts.get(settings)
        if ctx is None:
            ctx = _contexts[settings] = Context(settings, celery_app(settings))
        return ctx


def publish(ctx: Context) -> None:
    # The jobs are committed; if Redis is away, a worker's dispatcher publishes them later.
    try:
        dispatch(ctx.settings, ctx.app)
    except Exception as exc:  # noqa: BLE001 - publishing is best effort here
        log_event("publish_deferred", error=type(exc).__name__)
