"""Every status change of a job or a batch, in SQL: :mod:`jobs.store.jobs` and
:mod:`jobs.store.batches`, re-exported here.

Every move of a job is recorded in the same transaction as a row of ``batch_moves``,
which the dispatcher's sweep adds to the batch's counters (``fold_moves``), so that
the jobs of a batch do not queue on its row; the counters lag by a sweep at most::

    queued ──claim──▶ running ──record_success──▶ succeeded
      ▲  │               │ └──────record_failure──▶ failed ──retry_batch──▶ queued
      │  │               └──stop (not calling)──▶ cancelled
      │  └──stop──▶ cancelled
      └────hand_back / requeue_stuck (lease expired)──┘

Batches move through OpenAI's statuses::

    validating ──accept_batch──▶ in_progress ──last job ends──▶ finalizing ──end_batch──▶ completed
        │  └──reject_batch──▶ failed    │  └──expire_batch──▶ finalizing ──end_batch──▶ expired
        └──────────cancel_batch─────────┴──▶ cancelling ──end_batch──▶ cancelled

An ``in_progress`` batch whose budget ran out is paused (``pause_batch``): it stays
``in_progress`` with its reason in ``paused_reason``, its jobs stay queued and none is
published; ``set_budget`` clears the pause (:mod:`jobs.budget`).

``stop`` is what a cancel or an expiry does to the jobs of the batch: every job
that has not put its request on the wire ends ``cancelled`` (queued, published,
or running but waiting for its throttle slot or a retry); a call in flight
(``calling``) finishes and is recorded. ``end_batch`` runs once nothing of the
batch is queued or running: it names the batch's output and error files and sets
the final status, with the webhook event of that status in the same transaction.

A ``running`` job is leased to one worker until ``lease_until``; a redelivered
task for it is ignored until the lease expires, and a finished job is never
claimed again, so a duplicate Celery message costs nothing.

The functions a worker runs for every job take a :data:`Tx`, an ORM session or
a Core connection. The worker passes a connection (:func:`jobs.db.transaction`):
in a profile of a busy worker, a session's own bookkeeping added about 45 % to
the CPU of each statement it ran.
"""

from jobs.store.batches import (
    EVENTS,
    BatchFile,
    accept_batch,
    cancel_batch,
    end_batch,
    end_empty,
    expire_batch,
    expired_batches,
    finalizable,
    lock_finalizable,
    lock_validating,
    new_id,
    pause_batch,
    reject_batch,
    set_budget,
    stopping_batches,
    validating_batches,
)
from jobs.store.counts import COUNTERS, Counts, fold_moves, live_count, live_counts
from jobs.store.jobs import (
    ABANDONED,
    CANCELLED_CODE,
    EXPIRED_CODE,
    ClaimedJob,
    begin_attempt,
    claim,
    claim_many,
    finish_attempt,
    hand_back,
    is_finished,
    record_failure,
    record_success,
    renew_leases,
    requeue_stuck,
    retry_batch,
    stop_job,
)
from jobs.store.tables import Tx

__all__ = [
    "ABANDONED",
    "CANCELLED_CODE",
    "COUNTERS",
    "EVENTS",
    "EXPIRED_CODE",
    "BatchFile",
    "ClaimedJob",
    "Counts",
    "Tx",
    "accept_batch",
    "begin_attempt",
    "cancel_batch",
    "claim",
    "claim_many",
    "end_batch",
    "end_empty",
    "expire_batch",
    "expired_batches",
    "finalizable",
    "finish_attempt",
    "fold_moves",
    "hand_back",
    "is_finished",
    "live_count",
    "live_counts",
    "lock_finalizable",
    "lock_validating",
    "new_id",
    "pause_batch",
    "record_failure",
    "record_success",
    "reject_batch",
    "renew_leases",
    "requeue_stuck",
    "retry_batch",
    "set_budget",
    "stop_job",
    "stopping_batches",
    "validating_batches",
]
