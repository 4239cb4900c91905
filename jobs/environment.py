"""Where a process gets its services, checked once when it starts.

1. **On a dyno** (Heroku sets ``DYNO``), every service comes from its config var:
   ``DATABASE_URL``, ``REDIS_URL``, ``INFERENCE_URL`` and ``INFERENCE_KEY``. A missing
   one stops the process with one line naming the variable and the command that
   provides it. Nothing embedded is started and no simulator is used, ever.
2. **Off a dyno**, :func:`resolve` fills what is unset from the dev stack
   (:mod:`devstack.services`: embedded PostgreSQL and Redis, the simulator), when that
   package is installed. It is the only way into the dev stack from ``jobs`` or
   ``worker``, and only the CLI's entry point calls it: importing a module or calling
   the library starts nothing.
3. :func:`require` is the check of everything else (the library, the Celery app): the
   variables must already be set, by the environment or by a CLI that resolved them and
   passed them on (:func:`child_env`).
4. :func:`check_services` reaches PostgreSQL (and checks its schema) and Redis, and
   turns each way of failing into one line: :class:`ServiceError`.
   :func:`wait_for_services` retries it for ``SERVICE_WAIT_SECONDS`` at a worker's start.

Every message here is one line that names the variable or the command that fixes it,
and never a password.
"""

from __future__ import annotations

import importlib
import os
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from jobs.connections import is_tls, redis_tls_options
from jobs.constants import QUEUE_BULK, QUEUE_CONTROL, QUEUE_INTERACTIVE
from jobs.migrate import schema_problem
from jobs.settings import ConfigError, Settings

#: How each required variable is provided on Heroku, for the one-line error (an
#: attachment under another alias is attached ``--as`` that alias).
PROVIDERS = {
    "DATABASE_URL": "attach it with `heroku addons:create heroku-postgresql:essential-0 -a APP`",
    "REDIS_URL": "attach it with `heroku addons:create heroku-redis:mini -a APP`",
    "INFERENCE_URL": "attach it with `heroku ai:models:create -a APP kimi-k2-5 --as INFERENCE`",
    "INFERENCE_KEY": "attach it with `heroku ai:models:create -a APP kimi-k2-5 --as INFERENCE`",
    "API_KEYS": 'set it with `heroku config:set -a APP API_KEYS="$(openssl rand -hex 24)"`',
}
#: How the dev stack is installed, for the error off a dyno.
DEV_INSTALL = "pip install -e '.[dev]'"
#: Seconds one reachability check may take before it counts as a failed try.
CHECK_TIMEOUT_S = 5.0
#: Seconds between two tries of :func:`wait_for_services`.
RETRY_EVERY_S = 5.0


class ServiceError(Exception):
    """A service cannot be used: unreachable, refused TLS, or a schema to migrate.

    ``retryable`` is true for the faults that can pass by themselves (unreachable), false
    for those that need someone to act (a schema to migrate).
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def _missing(settings: Settings, *, inference: bool, web: bool = False) -> list[str]:
    names = []
    if settings.database_url is None:
        names.append("DATABASE_URL")
    if settings.redis_url is None:
        names.append("REDIS_URL")
    if inference and settings.inference_url is None:
        names.append(f"{settings.alias}_URL")
    if inference and settings.inference_url is not None and not settings.inference_key:
        names.append(f"{settings.alias}_KEY")
    if web and not settings.api_keys:
        names.append("API_KEYS")
    return names


def require(settings: Settings, *, inference: bool = False, web: bool = False) -> Settings:
    """``settings`` unchanged if every variable this process needs is set, else ConfigError.

    On a dyno every process needs all four; off a dyno the library needs the database
    and Redis, and the worker (``inference=True``) the model's URL and key too.
    """
    missing = _missing(settings, inference=inference or settings.dyno is not None, web=web)
    if not missing:
        return settings
    name = missing[0]
    if settings.dyno is not None:
        also = (
            " (or set it with `heroku config:set` if the add-on is attached under another name)"
            if name != "API_KEYS"
            else ""
        )
        provider = PROVIDERS.get(name) or (
            f"attach it with `heroku ai:models:create -a APP kimi-k2-5 --as {settings.alias}`"
        )
        raise ConfigError(f"{name} is not set on dyno {settings.dyno}: {provider}{also}")
    raise ConfigError(
        f"{name} is not set: set it, or run through `python -m jobs`, which starts the dev "
        "stack for what is unset"
    )


def resolve(settings: Settings, *, inference: bool = True, web: bool = False) -> Settings:
    """The one way into the dev stack: fill what is unset off a dyno, refuse on one.

    On a dyno this is :func:`require` with every variable. Off a dyno, unset service URLs
    come from :func:`devstack.services.resolve`, which starts (or joins) the embedded
    servers and the simulator under ``VAR_DIR``; without the dev stack installed, the
    error names the variable and how to install it.
    """
    if settings.dyno is not None:
        return require(settings, inference=True, web=web)
    missing = _missing(settings, inference=inference, web=web)
    if not missing:
        return settings
    try:
        services = importlib.import_module("devstack.services")
        absent = services.missing_dependencies()
    except ImportError:
        absent = ["devstack"]
    if absent:
        raise ConfigError(
            f"{missing[0]} is not set and the dev stack is not installed (no "
            f"{', '.join(absent)}): set it, or install the dev stack with `{DEV_INSTALL}`"
        )
    try:
        resolved: Settings = services.resolve(settings, inference=inference, web=web)
    except RuntimeError as exc:  # devstack.daemons.EmbeddedError: a server did not start
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ServiceError(f"the dev stack did not start: {lines[0]}", retryable=False) from None
    return resolved


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus the resolved URLs, for a worker or beat it starts."""
    env = dict(os.environ)
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    if settings.inference_url:
        env[f"{settings.alias}_URL"] = settings.inference_url
        env[f"{settings.alias}_KEY"] = settings.inference_key
    return env


def worker_argv(settings: Settings, *, concurrency: int | None = None) -> list[str]:
    """The Celery command line of a worker (what ``python -m jobs worker`` runs)."""
    queues = ",".join((QUEUE_INTERACTIVE, QUEUE_BULK, QUEUE_CONTROL))
    return [
        # --quiet: no banner, whose lines are not logfmt; the start-up line says it all.
        sys.executable, "-m", "celery", "-A", "worker.app", "--quiet", "worker",
        # Threads: each job spends its life waiting on the network or the
        # throttle; 100 threads cost a few MB, not 100 processes.
        "--pool", "threads",
        "--concurrency", str(concurrency or settings.worker_concurrency),
        "--queues", queues,
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip


def beat_argv() -> list[str]:
    """The Celery command line of the scheduler (what ``python -m jobs beat`` runs)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "--quiet", "beat", "--loglevel", "INFO"
    ]  # fmt: skip


# -- reaching the services ------------------------------------------------------------


def database_label(url: str) -> str:
    """``host:port/database`` of a database URL, never its password."""
    parsed = make_url(url)
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"


def redis_label(url: str) -> str:
    """``host:port`` of a Redis URL, never its password."""
    pool = redis.ConnectionPool.from_url(url)
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__


def check_database(url: str, *, schema: bool = True) -> None:
    """Connect to PostgreSQL once and check its schema, or raise :class:`ServiceError`."""
    engine = create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": max(1, round(CHECK_TIMEOUT_S))}
    )
    try:
        with engine.connect() as connection:
            problem = schema_problem(connection) if schema else None
    except DBAPIError as exc:
        reason = _first_line(exc.orig) if exc.orig is not None else _first_line(exc)
        raise ServiceError(
            f"cannot reach PostgreSQL at {database_label(url)} (DATABASE_URL): {reason}",
            retryable=True,
        ) from None
    except psycopg.Error as exc:  # raised outside SQLAlchemy's wrapping on connect
        raise ServiceError(
            f"cannot reach PostgreSQL at {database_label(url)} (DATABASE_URL): {_first_line(exc)}",
            retryable=True,
        ) from None
    finally:
        engine.dispose()
    if problem is not None:
        raise ServiceError(problem, retryable=False)


def check_redis(url: str) -> None:
    """Ping Redis once, or raise :class:`ServiceError` saying why it failed."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=CHECK_TIMEOUT_S,
        socket_connect_timeout=CHECK_TIMEOUT_S,
        **redis_tls_options(url),
    )
    where = f"Redis at {redis_label(url)} (REDIS_URL)"
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        cause = exc.__cause__ or exc.__context__
        reason = _first_line(exc)
        if isinstance(cause, ssl.SSLError) or "SSL" in reason:
            raise ServiceError(
                f"TLS with {where} failed: {reason} (a rediss:// URL needs a TLS server, "
                "a redis:// URL a plain one)",
                retryable=False,
            ) from None
        if is_tls(url) and isinstance(exc, redis.TimeoutError):
            # A plain server reads a TLS hello as the start of a command and waits.
            raise ServiceError(
                f"TLS with {where} got no answer: {reason} (is it a TLS server?)",
                retryable=True,
            ) from None
        raise ServiceError(f"cannot reach {where}: {reason}", retryable=True) from None
    except redis.RedisError as exc:
        raise ServiceError(f"{where} refused: {_first_line(exc)}", retryable=False) from None
    finally:
        client.close()


@dataclass(frozen=True)
class Needs:
    """Which services a command checks before it runs."""

    database: bool = True
    schema: bool = True
    redis: bool = True


def check_services(settings: Settings, needs: Needs = Needs()) -> None:
    """Every check ``needs`` asks for, in order; the first failure raises."""
    if needs.database:
        assert settings.database_url is not None
        check_database(settings.database_url, schema=needs.schema)
    if needs.redis:
        assert settings.redis_url is not None
        check_redis(settings.redis_url)


def wait_for_services(
    settings: Settings,
    needs: Needs = Needs(),
    *,
    on_retry: Callable[[ServiceError, float], None] | None = None,
) -> None:
    """:func:`check_services`, tried again for ``SERVICE_WAIT_SECONDS`` while retryable.

    ``on_retry(error, seconds_left)`` is called before each wait (one log line per try);
    the last error is raised once the time is up.
    """
    deadline = time.monotonic() + settings.service_wait_s
    while True:
        try:
            check_services(settings, needs)
            return
        except ServiceError as exc:
            left = deadline - time.monotonic()
            if not exc.retryable or left <= 0:
                raise
            if on_retry is not None:
                on_retry(exc, left)
            time.sleep(min(RETRY_EVERY_S, max(left, 0.0)))
