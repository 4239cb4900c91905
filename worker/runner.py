"""Run jobs: claim, check, throttle, call, record. No Celery in here.

The Celery task is a thin wrapper around :meth:`Runner.run_many`, so this logic is
tested directly against the real Postgres, Redis and simulator. A message carries
several bulk jobs (:func:`jobs.dispatch.messages`): they are claimed in one
transaction and run side by side, each on a thread of its own, and the message is
acknowledged once every one has ended.

Outcomes, each logged as one logfmt line:

* ``skipped``: the job is finished, cancelled or leased to another worker
  (a redelivered message), so nothing is called and nothing recorded.
* ``succeeded`` / ``failed``: a terminal state was recorded with its attempts.
* ``handed_back``: the job went back to the queue without a verdict, because
  the worker is shutting down, the remaining wait would outlive the broker's
  visibility timeout, or the provider rejects the key of every attachment serving
  its model (their key circuits of :mod:`jobs.circuit` are open: nothing is called
  until a probe gets through). While one attachment's key is rejected, its jobs go
  through the others (:mod:`worker.pool`).
* ``cancelled``: its batch was cancelled or expired before the job sent its
  request; the throttle slot it held or awaited is released (:mod:`worker.stops`).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from functools import partial
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection

from jobs import budget, daily_budget, store
from jobs.budget import Admission
from jobs.calibration import Calibrator
from jobs.circuit import Gate
from jobs.db import transaction
from jobs.logfmt import log_event
from jobs.settings import Settings
from jobs.validation import ValidationError, check_request, request_limits
from worker import spending
from worker.commits import GroupCommit
from worker.errors import AuthFailed, ModelError, RateLimited, RequestRejected
from worker.outages import OUTAGES
from worker.pool import Endpoint, Pool
from worker.responses import Completion
from worker.retry import RetryPolicy
from worker.slot import Slot
from worker.stops import Stops
from worker.throttle import NoBucket, RequestTooLarge, ThrottleInterrupted, ThrottleTimeout

Outcome = Literal["skipped", "succeeded", "failed", "handed_back", "cancelled"]

#: A task gives its job back this long before the visibility timeout would
#: make Redis deliver the message a second time.
VISIBILITY_MARGIN_S = 120.0
#: How long one step keeps retrying through a Postgres or Redis outage (a
#: restart, a failover) before the task gives up; a paid answer waits this long
#: to be recorded rather than be lost.
OUTAGE_PATIENCE_S = 120.0
#: How long a job whose call does not fit its batch's budget waits before asking again,
#: while calls of the batch on the wire may free what they reserved.
BUDGET_WAIT_S = 0.5
#: How long a probe call a runner claimed holds its circuit beyond the read timeout,
#: so that a second probe waits for its answer (the dispatcher's lease, too).
PROBE_LEASE_MARGIN_S = 60.0
T = TypeVar("T")


def call_id(job_id: int, attempt: int) -> str:
    """Our id of one call, sent to the provider: it names the ledger row of the call."""
    return f"bi-{job_id}-{attempt}"


class Runner:
    """Runs jobs for one worker process; thread-safe, one instance per process."""

    def __init__(
        self,
        settings: Settings,
        pool_for: Callable[[str], Pool],
        *,
        stop: threading.Event | None = None,
        policy: RetryPolicy | None = None,
        calibrator: Calibrator | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        assert settings.database_url is not None
        self.settings = settings
        self.pool_for = pool_for
        self.stop = stop or threading.Event()
        self.stops = Stops(self.stop)
        self.policy = policy or RetryPolicy(
            max_attempts=settings.max_attempts,
            base=settings.backoff_base,
            cap=settings.backoff_max,
        )
        self._db = settings.database_url
        self.calibrator = calibrator
        self._rng = random.Random()
        self._commits = GroupCommit(self._db)
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self._executor: futures.ThreadPoolExecutor | None = None
        # Told when a claimed job ends: its room in the dispatch window is free now.
        self._on_end = on_end or (lambda: None)
        self._limits = request_limits(settings)

    def _lease_s(self) -> float:
        return self.settings.job_lease_seconds

    def _in_tx(self, step: Callable[[Connection], T], *, job_id: int | None = None) -> T:
        """Run ``step`` in one transaction, retried whole through a brief outage; with
        ``job_id``, a transaction shared with other jobs' steps (:mod:`worker.commits`)."""

        def op() -> T:
            if job_id is not None:
                return self._commits.run(job_id, step)
            with transaction(self._db) as tx:
                return step(tx)

        return self._through_outage(op)

    def _through_outage(self, op: Callable[[], T]) -> T:
        """Run ``op``, retrying with backoff while Postgres or Redis is away.

        Sleeps ignore the stop event on purpose: during a shutdown, recording a
        call the provider already answered matters more than exiting early.
        """
        deadline = time.monotonic() + OUTAGE_PATIENCE_S
        delay = 0.25
        while True:
            try:
                return op()
            except OUTAGES as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log_event("outage", error=type(exc).__name__, retry_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def held(self) -> list[int]:
        """Ids of the jobs this runner is working on now (their leases need renewing)."""
        with self._held_lock:
            return list(self._held)

    def run(self, job_id: int) -> Outcome:
        """Run one job to a terminal state, or hand it back; see the module docstring."""
        return self.run_many([job_id])[0]

    def run_many(self, job_ids: Sequence[int]) -> list[Outcome]:
        """Run the jobs of one message side by side, claimed in one transaction; their
        outcomes in the order given. One job's crash does not stop the others: the first
        is raised once every job has ended."""
        deadline = time.monotonic() + self.settings.visibility_timeout - VISIBILITY_MARGIN_S
        claimed = self._in_tx(lambda tx: store.claim_many(tx, job_ids, lease_s=self._lease_s()))
        # Only a job this runner claimed is renewed by the heartbeat or handed back.
        with self._held_lock:
            self._held.update(job.id for job in claimed)
        outcomes: dict[int, Outcome] = {}
        taken = {job.id for job in claimed}
        for job_id in [job_id for job_id in dict.fromkeys(job_ids) if job_id not in taken]:
            outcomes[job_id] = "skipped"
            log_event("skipped", job=job_id, reason="finished or leased elsewhere")
        crashes: list[BaseException] = []

        def run_one(job: store.ClaimedJob) -> None:
            try:
                outcomes[job.id] = self._run_claimed(job, deadline)
            except BaseException as exc:  # noqa: BLE001 - raised below, once all have ended
                crashes.append(exc)

        others = [self._threads().submit(run_one, job) for job in claimed[1:]]
        if claimed:
            run_one(claimed[0])
        futures.wait(others)
        if crashes:
            raise crashes[0]
        return [outcomes[job_id] for job_id in job_ids]

    def _threads(self) -> futures.ThreadPoolExecutor:
        """The threads that run the jobs of a message beyond its first (which runs on the
        task's own thread); as many as a process may have jobs in flight."""
        with self._held_lock:
            if self._executor is None:
                self._executor = futures.ThreadPoolExecutor(
                    max_workers=self.settings.worker_concurrency, thread_name_prefix="job"
                )
            return self._executor

    def _run_claimed(self, job: store.ClaimedJob, deadline: float) -> Outcome:
        job_id = job.id
        waiter = self.stops.watch(job.batch_id)
        try:
            # A paused batch or a spent day: back to the queue before taking a throttle turn.
            paused = job.paused_reason or self._through_outage(
                partial(daily_budget.pause_reason, self.settings)
            )
            if paused is not None:
                return self._hand_back(job_id, {"job": job_id, "batch": job.batch_id}, paused)
            return self._work(job, deadline, waiter)
        except Exception as exc:
            # An outage outlasted OUTAGE_PATIENCE_S or a bug: give the job back now
            # rather than leave it to its lease, if Postgres lets us.
            log_event("crashed", job=job_id, error=type(exc).__name__, message=str(exc)[:200])
            try:
                with transaction(self._db) as tx:
                    store.hand_back(tx, job_id, reason=f"worker error: {type(exc).__name__}")
            except OUTAGES:
                pass
            raise
        finally:
            self.stops.forget(waiter)
            with self._held_lock:
                self._held.discard(job_id)
            self._on_end()

    def _interrupted(self, job_id: int, fields: dict[str, Any], reason: str) -> Outcome | None:
        """A wait of the job was cut short: the worker shuts down, or its batch stopped.

        Returns the job's outcome, or ``None`` when it should wait again (its batch is
        not stopping after all: a call of it was on the wire when the stop went out).
        """
        if self.stop.is_set():
            return self._hand_back(job_id, fields, reason)
        if self._in_tx(lambda tx: store.stop_job(tx, job_id)):
            log_event("cancelled", **fields, status="cancelled", reason="batch stopped")
            return "cancelled"
        if self._in_tx(lambda tx: store.is_finished(tx, job_id)):
            log_event("cancelled", **fields, status="cancelled", reason="batch stopped")
            return "cancelled"
        return None

    def _work(self, job: store.ClaimedJob, deadline: float, waiter: threading.Event) -> Outcome:
        fields: dict[str, Any] = {"job": job.id, "batch": job.batch_id}
        log_event("started", **fields, status="running")
        try:
            checked = check_request(job.request, self._limits)
        except ValidationError as exc:
            return self._fail(job.id, fields, "invalid_request", str(exc))
        cost = spending.cost_of(job, checked, self.settings, self.calibrator, self._through_outage)
        max_tokens = cost.max_tokens
        pool = self.pool_for(job.model)
        failures = 0
        while True:
            got = self._acquire(job, fields, pool, cost, deadline, waiter)
            if got is None:
                waiter = self._rewatch(waiter, job.batch_id)
                continue
            if isinstance(got, str):
                return got
            # Leaving this block before the call gives the slot back.
            with got as slot:
                endpoint = pool.endpoint(slot)
                gate = self._pass_gate(job.id, fields, pool, endpoint)
                if gate is None:
                    continue
                fields = {**fields, "attachment": endpoint.alias}
                number = self._ledger_row(cost, endpoint)
                if isinstance(number, Admission):
                    # The slot goes back; calls of the batch on the wire may free budget.
                    waited = self._over_budget(job, fields, number, deadline, waiter)
                    if isinstance(waited, str):
                        return waited
                    waiter = waited
                    continue
                if number is None:
                    # Cancelled (or expired) while it waited: the slot goes back unused.
                    log_event("skipped", **fields, reason="no longer running")
                    return "skipped"
                log_event(
                    "attempt",
                    **fields,
                    attempt=number,
                    reserved_tokens=slot.tokens,
                    request=self._body(job.request),
                )
                # With Redis away, the call goes as granted.
                slot.sending()
                started = time.monotonic()
                try:
                    completion = endpoint.client.chat(
                        job.request, client_request_id=call_id(job.id, number), on_sent=slot.sending
                    )
                except ModelError as exc:
                    latency_ms = int((time.monotonic() - started) * 1000)
                    # A 429 is not the job's fault: it waits for the reset, never gives up.
                    slot.failed(exc)
                    self._record_error(job.id, number, exc, latency_ms)
                    if isinstance(exc, AuthFailed):
                        # The key, not the job, is wrong: the other attachments go on.
                        self._key_rejected(fields, number, exc, pool, endpoint)
                        continue
                    failures += not isinstance(exc, RateLimited)
                    delay = self._next_try(
                        job.id, fields, number, exc, failures, deadline, latency_ms
                    )
                    if isinstance(delay, str):
                        return delay
                    waited = self._wait(job, fields, waiter, delay)
                    if isinstance(waited, str):
                        return waited
                    waiter = waited
                    continue
                # The answer is paid for: record it before anything else, so that a worker
                # killed now loses as few answers as possible.
                outcome = self._succeed(job.id, fields, number, completion, max_tokens, slot)
                self._close_circuit(fields, number, gate, endpoint)
                return outcome

    def _wait(
        self, job: store.ClaimedJob, fields: dict[str, Any], waiter: threading.Event, delay: float
    ) -> Outcome | threading.Event:
        """Wait ``delay`` before the job's next try: the job's outcome if the wait ended it
        (a shutdown, its batch stopped), else the event to wait on next."""
        if not waiter.wait(delay):
            return waiter
        outcome = self._interrupted(job.id, fields, "worker shutting down")
        if outcome is not None:
            return outcome
        return self._rewatch(waiter, job.batch_id)

    def _over_budget(
        self,
        job: store.ClaimedJob,
        fields: dict[str, Any],
        admission: Admission,
        deadline: float,
        waiter: threading.Event,
    ) -> Outcome | threading.Event:
        """A call that does not fit a budget: failed if it never could, handed back if the
        budget is spent or the wait would outlive the task, else a wait before it asks
        again."""
        if admission.verdict == "too_large":
            return self._fail(job.id, fields, "over_budget", admission.reason or "over budget")
        if admission.verdict == "paused":
            return self._hand_back(job.id, fields, admission.reason or "batch paused")
        if time.monotonic() > deadline - self.settings.read_timeout:
            return self._hand_back(job.id, fields, f"budget: {admission.reason}")
        return self._wait(job, fields, waiter, BUDGET_WAIT_S)

    def _ledger_row(self, cost: spending.Cost, endpoint: Endpoint) -> int | Admission | None:
        """:func:`worker.spending.begin` in a transaction shared with other jobs' writes,
        but where a budget's locks must keep their own order."""
        # Priced first: the calibration may read the database on a connection of its own.
        worst_prompt = cost.worst_prompt()
        begin = partial(spending.begin, cost, worst_prompt, endpoint, lease_s=self._lease_s())
        return self._in_tx(begin, job_id=None if spending.needs_look(cost) else cost.job.id)

    def _close_circuit(
        self, fields: dict[str, Any], number: int, gate: Gate, endpoint: Endpoint
    ) -> None:
        """After a recorded answer: a probe's success closes the key circuit."""
        if gate == "probe":
            self._through_outage(lambda: endpoint.circuit.close(fields["job"]))
            log_event("circuit_closed", **fields, attempt=number)

    def _next_try(
        self,
        job_id: int,
        fields: dict[str, Any],
        number: int,
        exc: ModelError,
        failures: int,
        deadline: float,
        latency_ms: int,
    ) -> Outcome | float:
        """After a failed call: the job's outcome, or how long to wait before calling again."""
        delay = self.policy.delay(exc, max(failures, 1), rng=self._rng)
        if delay is None:
            # A rejection keeps the provider's answer (an output line's response).
            answer = exc if isinstance(exc, RequestRejected) else None
            return self._fail(job_id, fields, exc.kind, str(exc), attempt=number, answer=answer)
        if time.monotonic() + delay > deadline - self.settings.read_timeout:
            return self._hand_back(job_id, fields, f"retry would outlive the task: {exc}")
        log_event(
            "retry",
            **fields,
            attempt=number,
            http_status=exc.status,
            error=exc.kind,
            delay_s=round(delay, 3),
            latency_ms=latency_ms,
        )
        return delay

    def _acquire(
        self,
        job: store.ClaimedJob,
        fields: dict[str, Any],
        pool: Pool,
        cost: spending.Cost,
        deadline: float,
        waiter: threading.Event,
    ) -> Slot | Outcome | None:
        """The job's throttle slot; or the job's outcome if it ends instead; ``None``: the
        wait was cut short for nothing, or the call must wait for budget: ask again."""
        if spending.needs_look(cost):
            call = cost.worst_case()
            looked = self._in_tx(partial(spending.look, cost=cost, call=call))
        else:
            looked = budget.FITS
        if looked.verdict == "wait":
            if time.monotonic() > deadline - self.settings.read_timeout:
                return self._hand_back(job.id, fields, f"budget: {looked.reason}")
            # No throttle turn taken: it goes to a job that may call. The caller watches
            # again whatever ends the wait (``None``).
            if waiter.wait(BUDGET_WAIT_S):
                return self._interrupted(job.id, fields, "worker shutting down")
            return None
        wait_budget = deadline - time.monotonic() - self.settings.read_timeout
        take = partial(
            pool.take, cost.price, max_wait=wait_budget, stop=waiter, priority=job.priority
        )
        try:
            try:
                return self._through_outage(take)
            except NoBucket:
                # Every attachment is set aside in this process, but this job may be the
                # probe a dispatcher picked for one of them: it calls there, or nobody does
                # until the probe's lease ends.
                probe = self._through_outage(partial(pool.probe_of, job.id))
                if probe is None:
                    return self._paused(job.id, fields, pool)
                return self._through_outage(partial(take, only=probe))
        except RequestTooLarge as exc:
            return self._fail(job.id, fields, "request_too_large", str(exc))
        except ThrottleTimeout as exc:
            return self._hand_back(job.id, fields, f"throttle: {exc}")
        except ThrottleInterrupted as exc:
            return self._interrupted(job.id, fields, f"throttle: {exc}")

    def _pass_gate(
        self, job_id: int, fields: dict[str, Any], pool: Pool, endpoint: Endpoint
    ) -> Gate | None:
        """The key circuit of the slot's attachment (:meth:`Pool.gate`): ``closed`` or
        ``probe`` to call there, ``None`` to ask the pool for a slot again (the caller
        gives this one back)."""
        away: list[BaseException] = []
        lease_s = self.settings.read_timeout + PROBE_LEASE_MARGIN_S

        def ask() -> Gate:
            try:
                return pool.gate(endpoint, job_id, lease_s)
            except OUTAGES as exc:
                away.append(exc)
                raise

        gate = self._through_outage(ask)
        if away:
            # Redis went away after granting this slot: one that lost its data has a new
            # bucket, rebuilt from the ledger, where the slot does not exist (its call has
            # no ledger row yet). Ask for a slot again rather than call unseen.
            log_event("slot_lost", **fields, reason="Redis was away after the slot")
            return None
        return None if gate == "open" else gate

    def _rewatch(self, waiter: threading.Event, batch_id: int | None) -> threading.Event:
        self.stops.forget(waiter)
        return self.stops.watch(batch_id)

    def _body(self, body: dict[str, Any]) -> str | None:
        """A body for the log only when LOG_BODIES is set (``None`` fields are dropped)."""
        return json.dumps(body, separators=(",", ":")) if self.settings.log_bodies else None

    def _record_error(self, job_id: int, number: int, exc: ModelError, latency_ms: int) -> None:
        usage = getattr(exc, "usage", None)

        def _step(tx: Connection) -> None:
            store.finish_attempt(
                tx,
                job_id,
                number,
                latency_ms=latency_ms,
                http_status=exc.status,
                error_kind=exc.kind,
                error_message=str(exc)[:1000],
                request_id=exc.request_id,
                usage=(
                    (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
                    if usage is not None
                    else (0, 0, 0)
                ),
            )

        self._in_tx(_step)

    def _succeed(
        self,
        job_id: int,
        fields: dict[str, Any],
        number: int,
        completion: Completion,
        max_tokens: int,
        slot: Slot,
    ) -> Outcome:
        usage = completion.usage
        triple = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        latency_ms = int(completion.latency_s * 1000)

        # The ledger row and the result commit together: recorded exactly once.
        def _step(tx: Connection) -> None:
            store.finish_attempt(
                tx,
                job_id,
                number,
                latency_ms=latency_ms,
                http_status=completion.status,
                request_id=completion.request_id,
                usage=triple,
                ends_job=True,
            )
            store.record_success(
                tx,
                job_id,
                request_id=completion.request_id,
                response=completion.body,
                output_text=completion.output_text,
                reasoning_text=completion.reasoning_text,
                tool_calls=completion.tool_calls,
                finish_reason=completion.finish_reason,
                usage=triple,
            )

        # Recorded first: the answer is paid for, the bucket's bookkeeping is not.
        self._in_tx(_step, job_id=job_id)
        if self.calibrator is not None:
            self.calibrator.answered()
        slot.answered(
            spending.charge(self.settings, completion.usage, max_tokens), completion.rate_limits
        )
        log_event(
            "succeeded",
            **fields,
            status="succeeded",
            attempt=number,
            latency_ms=latency_ms,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            tokens=usage.total_tokens,
            response=self._body(completion.body),
        )
        return "succeeded"

    def _fail(
        self,
        job_id: int,
        fields: dict[str, Any],
        code: str,
        message: str,
        *,
        attempt: int | None = None,
        answer: ModelError | None = None,
    ) -> Outcome:
        def _step(tx: Connection) -> None:
            store.record_failure(
                tx,
                job_id,
                code=code,
                message=message[:2000],
                http_status=answer.status if answer is not None else None,
                request_id=answer.request_id if answer is not None else None,
                body=answer.body if answer is not None else None,
            )

        self._in_tx(_step)
        log_event("failed", **fields, status="failed", attempt=attempt, error=code, message=message)
        return "failed"

    def _key_rejected(
        self, fields: dict[str, Any], number: int, exc: AuthFailed, pool: Pool, endpoint: Endpoint
    ) -> None:
        """The key, not the job, is wrong: its attachment is set aside (:meth:`Pool.reject`)
        and the job asks the pool again; with every attachment set aside, it is handed back
        (:meth:`_paused`)."""
        status = exc.status or 401
        wait_s = self._through_outage(
            partial(pool.reject, endpoint, str(exc), status, fields["job"])
        )
        log_event(
            "circuit_open", **fields, attempt=number, http_status=status, next_try_s=round(wait_s)
        )

    def _paused(self, job_id: int, fields: dict[str, Any], pool: Pool) -> Outcome:
        """Hand the job back while every attachment of its pool is set aside, with why as
        the job's error."""
        return self._hand_back(job_id, fields, self._through_outage(pool.paused_reason))

    def _hand_back(self, job_id: int, fields: dict[str, Any], reason: str) -> Outcome:
        def _step(tx: Connection) -> None:
            store.hand_back(tx, job_id, reason=reason[:2000])

        self._in_tx(_step)
        log_event("handed_back", **fields, status="queued", reason=reason)
        return "handed_back"
