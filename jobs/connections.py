"""Redis clients and the Celery app, configured from :class:`~jobs.settings.Settings`.

Heroku Key-Value Store serves ``rediss://`` with a self-signed certificate, so
every TLS client here (broker, redbeat, throttle) is told not to verify it; a
``rediss://`` URL without ``ssl_cert_reqs`` makes Celery refuse to start.

The Celery app is built here, not in ``worker``, so that ``jobs`` can publish
tasks by name without importing the worker package.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

import redis
from celery import Celery

from jobs import broker
from jobs.constants import (
    QUEUE_BULK,
    QUEUE_CONTROL,
    REDBEAT_LOCK_KEY,
    REDBEAT_PREFIX,
    TASK_RUN_JOB,
)
from jobs.settings import Settings

#: Redis socket timeouts: short enough that a vanished Redis is noticed quickly.
REDIS_SOCKET_TIMEOUT = 15.0
REDIS_CONNECT_TIMEOUT = 5.0
#: Connections one client opens at most; a thread that finds them all busy waits
#: for one (up to REDIS_SOCKET_TIMEOUT) instead of opening another. Every command
#: we send is short, so a few serve a worker's hundreds of threads. Heroku's
#: Key-Value Store allows 20 clients in all on its mini plan, and a worker's Celery
#: connections, beat and the CLI need the rest (README, "Connection budget").
#: redis-py's own pool would open up to 100 and then raise "Too many connections".
REDIS_POOL_SIZE = 6
#: What our own Redis connections call themselves (``CLIENT LIST`` shows it), and Celery's.
REDIS_CLIENT_NAME = "batch-infer"
CELERY_CLIENT_NAME = "batch-infer-celery"


def is_tls(url: str) -> bool:
    return url.startswith("rediss://")


def redis_tls_options(url: str) -> dict[str, Any]:
    """redis-py options for ``url``: TLS without certificate checks for ``rediss://``."""
    if is_tls(url):
        return {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
    return {}


def redis_client(url: str) -> redis.Redis:
    """A redis-py client for ``url``; TLS without certificate checks for ``rediss://``."""
    extra = redis_tls_options(url)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=REDIS_SOCKET_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        health_check_interval=30,
        retry_on_timeout=True,
        client_name=REDIS_CLIENT_NAME,
        **extra,
    )
    return redis.Redis(connection_pool=pool)


_shared: dict[tuple[int, str], redis.Redis] = {}
_shared_lock = threading.Lock()


def shared_redis(url: str) -> redis.Redis:
    """One client per URL and process (its pool is thread-safe); a forked child gets its own."""
    ident = (os.getpid(), url)
    with _shared_lock:
        client = _shared.get(ident)
        if client is None:
            client = _shared[ident] = redis_client(url)
        return client


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the producer (``jobs``) and the worker."""
    url = settings.redis_url
    assert url is not None, "REDIS_URL is required (jobs.environment.require)"
    tls = {"ssl_cert_reqs": ssl.CERT_NONE} if is_tls(url) else None
    transport = {
        # Unacked tasks come back after this long; no task may wait longer.
        "visibility_timeout": settings.visibility_timeout,
        "socket_timeout": REDIS_SOCKET_TIMEOUT,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
        "health_check_interval": 30,
        "client_name": CELERY_CLIENT_NAME,
    }
    return {
        "broker_url": url,
        # kombu's Redis transport, minus a crash when the consumer reconnects.
        "broker_transport": broker.transport_for(url),
        "broker_use_ssl": tls,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Results live in Postgres; a result backend would only cost Redis memory.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only when it is recorded; a worker that dies
        # mid-call gives the message back instead of losing it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Jobs are owned through Postgres leases, not broker connections; the
        # threads pool cannot cancel a task anyway (it would only log errors).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # No remote control (`celery inspect`): its mailbox holds two more Redis
        # connections per worker, and nothing here uses it.
        "worker_enable_remote_control": False,
        # Heroku: SIGTERM, then SIGKILL 30 s later. SIGTERM is Celery's warm
        # shutdown: no new tasks, jobs waiting on the throttle or a backoff hand
        # themselves back, calls in flight may finish. (Remapping SIGTERM to a
        # cold shutdown crashes the threads pool, which cannot kill a job.)
        "worker_hijack_root_logger": False,
        "task_default_queue": QUEUE_CONTROL,
        "task_routes": {TASK_RUN_JOB: {"queue": QUEUE_BULK}},
        "task_create_missing_queues": True,
        "redbeat_redis_url": url,
        "redbeat_redis_use_ssl": tls,
        "redbeat_redis_options": {
            "socket_timeout": REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
            "health_check_interval": 30,
            "client_name": CELERY_CLIENT_NAME,
        },
        "redbeat_key_prefix": REDBEAT_PREFIX,
        "redbeat_lock_key": REDBEAT_LOCK_KEY,
        # A standby (or restarted) beat takes over at most this long after the
        # active one dies without releasing the lock (kill -9, lost dyno); the
        # active one renews it every loop, so the loop must be well shorter.
        "redbeat_lock_timeout": 30,
        "beat_max_loop_interval": 5,
        "timezone": "UTC",
        "enable_utc": True,
    }


def celery_app(settings: Settings, *, main: str = "batch_infer") -> Celery:
    """A Celery app on the settings' Redis; the worker adds its tasks to it."""
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
