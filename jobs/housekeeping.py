"""What every worker's dispatcher does besides publishing jobs, each DISPATCH_INTERVAL.

0. The jobs' moves are added to their batches' counters (:func:`jobs.store.fold_moves`),
   and a running batch with none left queued or running is finalizing.
1. Batches whose completion window closed expire (:func:`jobs.store.expire_batch`):
   their unsent jobs stop, and they end ``expired`` once their calls on the wire end.
2. Batches with nothing queued or running that wait to end get their finalize task.
3. Batches the Batches API left ``validating`` for a minute get their validation task
   again (the web process that should have published it may have died).
4. With WEBHOOK_URL set, the webhook events that are due are claimed and a delivery
   task is published for each (:func:`jobs.webhooks.publish_due`); the claim, not a
   Redis key, keeps two sweeps from sending the same attempt.
5. The ids of batches being stopped (cancelled, expired) are returned: the worker
   wakes its jobs of those batches that wait for a slot or a retry
   (:mod:`worker.stops`).

Every worker sweeps, so a task is published under a short-lived Redis key
(:func:`jobs.constants.once_key`): the first sweep to set it publishes, the others
skip it, and a task lost with its worker is published again once the key expires.
"""

from __future__ import annotations

from celery import Celery

from jobs import store, webhooks
from jobs.connections import shared_redis
from jobs.constants import QUEUE_CONTROL, TASK_FINALIZE_BATCH, TASK_VALIDATE_BATCH, once_key
from jobs.db import transaction
from jobs.logfmt import log_event
from jobs.settings import Settings

#: Seconds a published housekeeping task has before the sweep publishes it again.
ONCE_FOR_S = 60
#: Seconds a batch may stay ``validating`` before its validation is published again.
VALIDATION_GRACE_S = 60.0


def publish_once(settings: Settings, app: Celery, task: str, ident: int | str) -> bool:
    """Publish ``task(ident)`` unless a sweep did within :data:`ONCE_FOR_S`."""
    assert settings.redis_url is not None
    if not shared_redis(settings.redis_url).set(once_key(task, ident), "1", nx=True, ex=ONCE_FOR_S):
        return False
    app.send_task(task, args=[ident], queue=QUEUE_CONTROL)
    return True


def sweep(settings: Settings, app: Celery) -> list[int]:
    """One round of housekeeping; returns the ids of batches being stopped."""
    assert settings.database_url is not None
    url = settings.database_url
    with transaction(url) as tx:
        store.fold_moves(tx)
    with transaction(url) as tx:
        expired = store.expired_batches(tx)
    for batch_id in expired:
        with transaction(url) as tx:
            stopped = store.expire_batch(tx, batch_id)
        log_event("batch_expired", batch=batch_id, stopped=stopped)
    with transaction(url) as tx:
        ending = store.finalizable(tx)
        stale = store.validating_batches(tx, older_than_s=VALIDATION_GRACE_S)
        stopping = store.stopping_batches(tx)
    for batch_id in ending:
        publish_once(settings, app, TASK_FINALIZE_BATCH, batch_id)
    for batch_id in stale:
        publish_once(settings, app, TASK_VALIDATE_BATCH, batch_id)
    if settings.webhook_url is not None:
        webhooks.publish_due(settings, app)
    return stopping
