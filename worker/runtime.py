"""Per-process state of a worker: the pools of attachments (each one's client, circuit
and throttle bucket), the runner and the dispatcher loop.

Built lazily on first use, so importing the Celery app stays cheap and a forked
process never inherits its parent's sockets.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis

from jobs import housekeeping, presence, reports, store
from jobs.attachments import distinct_buckets
from jobs.calibration import Calibrator
from jobs.circuit import KeyCircuit
from jobs.connections import celery_app, shared_redis
from jobs.db import session_scope
from jobs.dispatch import dispatch
from jobs.logfmt import log_event
from jobs.settings import Attachment, Settings, is_loopback_host
from worker.client import ModelClient, default_timeout
from worker.pool import Endpoint, Pool
from worker.runner import Runner
from worker.throttle import Throttle, ThrottleStats

#: After a wake, the dispatcher waits this long for more jobs to finish before it
#: sweeps: at full speed a sweep per finished job took a quarter of the worker's
#: GIL time, and the dispatch window holds far more than this much work.
DISPATCH_COALESCE_S = 0.05


class Runtime:
    """Everything one worker process shares between its task threads."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None and settings.database_url is not None
        self.settings = settings
        self.pid = os.getpid()
        #: How this process is named among the live workers (:mod:`jobs.presence`).
        self.node = f"{socket.gethostname()}:{self.pid}"
        self.stop = threading.Event()
        self._wake = threading.Event()
        # The one pool of this process, shared with the dispatcher and the circuit.
        self.redis: redis.Redis = shared_redis(settings.redis_url)
        self.app = celery_app(settings)
        assert settings.inference_url is not None, "resolve the settings first (simulator URL)"
        self._logged_stats: dict[str, ThrottleStats] = {}
        self._lock = threading.Lock()
        # One endpoint per bucket: two aliases with one key and model are one endpoint.
        self.endpoints = tuple(self._endpoint(a) for a in distinct_buckets(settings.attachments))
        self.pools = {
            model: Pool(model, [e for e in self.endpoints if e.model == model])
            for model in settings.served_models
        }
        self.runner = Runner(
            settings,
            self.pool_for,
            stop=self.stop,
            calibrator=Calibrator(settings.database_url),
            on_end=self.wake_dispatcher,
        )
        self._dispatcher: threading.Thread | None = None

    def pool_for(self, model: str) -> Pool:
        """The attachments serving ``model`` (the same buckets in every process)."""
        return self.pools[model]

    def _endpoint(self, attachment: Attachment) -> Endpoint:
        settings = self.settings
        assert attachment.url is not None
        window_s = 60.0 + settings.window_margin_s
        throttle = Throttle(
            self.redis,
            attachment.bucket_name,
            rpm=attachment.rpm,
            tpm=attachment.tpm,
            margin_s=settings.window_margin_s,
            interactive_reserve=settings.interactive_reserve,
            floor=attachment.headroom,
            # A call up to this late still lands outside the next window's
            # calls; the other half of the margin is left to network jitter.
            late_start_ms=round(settings.window_margin_s * 500),
            seed=self._seed_for(attachment, window_s),
        )
        return Endpoint(
            alias=attachment.alias,
            key_hash=attachment.key_hash,
            model=attachment.model_id,
            client=ModelClient(
                attachment.url,
                attachment.key,
                timeout=default_timeout(settings.connect_timeout, settings.read_timeout),
            ),
            circuit=KeyCircuit(
                self.redis,
                attachment.key_hash,
                first_wait_s=settings.auth_retry_s,
                alias=attachment.alias,
            ),
            throttle=throttle,
        )

    def _seed_for(
        self, attachment: Attachment, window_s: float
    ) -> Callable[[], list[tuple[float, int]]]:
        """Rebuild a lost bucket from the ledger's calls of the last window with its key."""
        settings = self.settings
        assert settings.database_url is not None
        url = settings.database_url

        def seed() -> list[tuple[float, int]]:
            with session_scope(url) as session:
                calls = reports.recent_calls(
                    session,
                    window_s=window_s,
                    model=attachment.model_id,
                    key_hash=attachment.key_hash,
                )
            return [
                (
                    call.age_s,
                    call.prompt_tokens
                    + (
                        call.completion_tokens
                        if call.answered and settings.tpm_charge == "actual"
                        else (call.max_tokens or settings.default_max_tokens)
                    ),
                )
                for call in calls
            ]

        return seed

    def log_startup(self, *, node: str, concurrency: int) -> None:
        """The worker's one start-up line: what it calls, at which limits, how wide."""
        settings = self.settings
        log_event(
            "worker_started",
            node=node,
            model=settings.model_id,
            rpm=settings.rpm,
            tpm=settings.tpm,
            attachments=",".join(e.alias for e in self.endpoints),
            pool_rpm=settings.pool_rpm,
            limits_from=",".join(settings.limits_from_env) or "table",
            tpm_charge=settings.tpm_charge,
            bucket=settings.bucket_name,
            concurrency=concurrency,
            dispatch_window=settings.dispatch_window,
            dispatch_window_max=settings.dispatch_window_max,
            simulated=is_loopback_host(urlsplit(settings.inference_url or "").hostname),
        )

    def start_dispatcher(self) -> None:
        """Start this process's dispatcher and lease-renewal loops (one each per process)."""
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="dispatcher", daemon=True
            )
            self._dispatcher.start()
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()

    def _heartbeat_loop(self) -> None:
        """Renew the leases of this process's running jobs.

        Leases are short so that a killed worker's jobs are re-queued within
        JOB_LEASE_SECONDS; renewing at a quarter of the lease rides out a
        Postgres outage of up to about three quarters of it.
        """
        url = self.settings.database_url
        assert url is not None
        interval = self.settings.job_lease_seconds / 4
        while not self.stop.wait(interval):
            self.log_throttle_stats()
            held = self.runner.held()
            if not held:
                continue
            try:
                with session_scope(url) as session:
                    store.renew_leases(session, held, lease_s=self.settings.job_lease_seconds)
            except Exception as exc:  # noqa: BLE001 - Postgres blip: renew next time
                log_event("heartbeat_error", error=type(exc).__name__, message=str(exc)[:200])

    def log_throttle_stats(self) -> None:
        """Log each bucket's admitted calls and Redis commands so far, when they changed.

        ``event=throttle_stats pid=4242 model=kimi-k2-5 admitted=750
        redis_round_trips=1712 per_admitted=2.28``: the counts are this process's since
        it started, so the last lines of every process add up to the whole run.
        """
        changed: list[tuple[Endpoint, ThrottleStats]] = []
        with self._lock:
            for endpoint in self.endpoints:
                stats = endpoint.throttle.stats()
                if self._logged_stats.get(endpoint.alias) != stats:
                    self._logged_stats[endpoint.alias] = stats
                    changed.append((endpoint, stats))
        for endpoint, stats in changed:
            log_event(
                "throttle_stats",
                pid=self.pid,
                model=endpoint.model,
                attachment=endpoint.alias,
                admitted=stats.admitted,
                redis_round_trips=stats.redis_round_trips,
                per_admitted=(
                    round(stats.redis_round_trips / stats.admitted, 2) if stats.admitted else None
                ),
            )

    def wake_dispatcher(self) -> None:
        """A job finished: there is room for the next one now, not in a few seconds."""
        self._wake.set()

    def _mark_alive(self) -> None:
        """Tell waiting users this worker consumes (:mod:`jobs.presence`); best effort."""
        try:
            presence.mark(self.redis, self.node)
        except redis.RedisError as exc:
            log_event("presence_error", error=type(exc).__name__)

    def _dispatch_loop(self) -> None:
        interval = self.settings.dispatch_interval
        last_requeue = -interval
        next_mark = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_mark:
                self._mark_alive()
                next_mark = time.monotonic() + presence.MARK_EVERY_S
            # Expired leases are found on the DISPATCH_INTERVAL cadence, not on every
            # wake: a lease lasts many seconds, and jobs finish many times a second.
            requeue = time.monotonic() - last_requeue >= interval
            try:
                dispatch(self.settings, self.app, requeue=requeue)
                if requeue:
                    last_requeue = time.monotonic()
                    # The rest of the housekeeping keeps the same cadence.
                    self.runner.stops.stop_batches(housekeeping.sweep(self.settings, self.app))
            except Exception as exc:  # noqa: BLE001 - Redis or Postgres blip: try again later
                log_event("dispatch_error", error=type(exc).__name__, message=str(exc)[:200])
            self._wake.wait(interval)
            self._wake.clear()
            # Jobs that finish together share one sweep instead of one sweep each.
            self.stop.wait(DISPATCH_COALESCE_S)

    def shutdown(self) -> None:
        """Stop waiting and dispatching; calls in flight keep their connections and finish."""
        self.runner.stops.stop_all()
        self._wake.set()
        self.log_throttle_stats()
        try:
            presence.unmark(self.redis, self.node)
        except redis.RedisError as exc:
            log_event("presence_error", error=type(exc).__name__)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """This process's runtime on ``settings``; a forked child builds its own."""
    global _runtime  # noqa: PLW0603 - one runtime per process
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(settings)
        return _runtime
