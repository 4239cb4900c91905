"""Every Redis key, Celery task name and queue name the system uses.

``jobs`` sends tasks by these names and never imports ``worker``; keeping them
in one place makes the Redis footprint reviewable at a glance.
"""

from __future__ import annotations

#: Prefix of every key this project writes (Celery's own queue keys excepted).
KEY_PREFIX = "bi:"

#: Queue for interactive jobs (``enqueue``); workers consume it first.
QUEUE_INTERACTIVE = "inference.interactive"
#: Queue for bulk jobs (files, ``submit_batch``, nightly runs).
QUEUE_BULK = "inference.bulk"
#: Queue for housekeeping (dispatch, maintenance, retention purge, nightly batch creation).
QUEUE_CONTROL = "inference.control"

TASK_RUN_JOB = "worker.tasks.run_job"
TASK_DISPATCH = "worker.tasks.dispatch"
TASK_REQUEUE_STUCK = "worker.tasks.requeue_stuck"
TASK_NIGHTLY_BATCH = "worker.tasks.nightly_batch"
TASK_PURGE = "worker.tasks.purge"
TASK_VALIDATE_BATCH = "worker.tasks.validate_batch"
TASK_FINALIZE_BATCH = "worker.tasks.finalize_batch"
TASK_DELIVER_WEBHOOK = "worker.tasks.deliver_webhook"

#: Set by the first dispatcher to see this Redis; its absence means Redis lost its
#: data (a restart without persistence, a flush), so every published message is gone.
DISPATCH_EPOCH_KEY = KEY_PREFIX + "dispatch:epoch"

#: Set while the deployment's daily budget is spent (:mod:`jobs.daily_budget`): JSON of
#: the UTC day, the limits it was reached under and the reason. Expires after two days.
DAILY_PAUSE_KEY = KEY_PREFIX + "daily-budget:paused"

#: redbeat keeps its schedule and its single-beat lock under this prefix.
REDBEAT_PREFIX = KEY_PREFIX + "redbeat:"
#: The lock only one beat process holds at a time.
REDBEAT_LOCK_KEY = REDBEAT_PREFIX + "lock"


# The log, its costs and their total are named ``calls``, ``tokens`` and ``total`` since
# the total was added: a worker of a release before it, still running during a deploy,
# keeps its ``log`` and ``costs`` apart instead of changing them without the total.


def throttle_log_key(bucket: str) -> str:
    """Sorted set of the calls admitted in the window: member = call id, score = admit
    time (ms of Redis time). The throttle's keys are described in
    :mod:`worker.throttle_scripts`."""
    return f"{KEY_PREFIX}throttle:{{{bucket}}}:calls"


def throttle_costs_key(bucket: str) -> str:
    """Hash of the logged calls' costs: call id -> tokens."""
    return f"{KEY_PREFIX}throttle:{{{bucket}}}:tokens"


def throttle_pause_key(bucket: str) -> str:
    """Redis-time (ms) until which the bucket admits nothing, set after a 429."""
    return f"{KEY_PREFIX}throttle:{{{bucket}}}:pause"


def throttle_total_key(bucket: str) -> str:
    """The tokens of every call in the log; its absence means the log was lost."""
    return f"{KEY_PREFIX}throttle:{{{bucket}}}:total"


def throttle_pace_key(bucket: str) -> str:
    """Redis-time (ms) of the bucket's next bulk admission."""
    return f"{KEY_PREFIX}throttle:{{{bucket}}}:pace"


def throttle_room_key(bucket: str) -> str:
    """Hash of the room learnt for other clients of the key: requests, tokens, at."""
    return f"{KEY_PREFIX}throttle:{{{bucket}}}:room"


def circuit_key(fingerprint: str) -> str:
    """Hash of the key circuit, present while the provider rejects that key (401/403)."""
    return f"{KEY_PREFIX}circuit:{fingerprint}"


#: Sorted set of live worker processes: member ``<host>:<pid>``, score = the Redis time
#: (s) it last said it was alive (:mod:`jobs.presence`).
WORKERS_KEY = KEY_PREFIX + "workers"


def once_key(task: str, ident: object) -> str:
    """Present while a housekeeping task for ``ident`` was published and may still run:
    sweeps in every worker see the same batch, and only one of them publishes its task."""
    return f"{KEY_PREFIX}once:{task}:{ident}"
