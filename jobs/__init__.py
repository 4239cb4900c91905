"""Batch inference on Heroku Managed Inference: submit, track and report chat-completion jobs.

``import jobs`` is enough::

    job = jobs.enqueue([{"role": "user", "content": "Hi"}], max_tokens=50)
    batch = jobs.submit_file("requests.jsonl")
    batch.wait()

Calls read DATABASE_URL and REDIS_URL once (or the settings given to :func:`configure`);
see :mod:`jobs.api` for every function.
"""

from jobs.api import (
    BatchHandle,
    BatchProgress,
    JobHandle,
    JobResult,
    NotFoundError,
    configure,
    enqueue,
    get_batch,
    get_job,
    submit_batch,
    submit_file,
    submit_scheduled,
)
from jobs.environment import ServiceError
from jobs.settings import ConfigError, Settings
from jobs.validation import ValidationError

__all__ = [
    "BatchHandle",
    "BatchProgress",
    "ConfigError",
    "JobHandle",
    "JobResult",
    "NotFoundError",
    "ServiceError",
    "Settings",
    "ValidationError",
    "configure",
    "enqueue",
    "get_batch",
    "get_job",
    "submit_batch",
    "submit_file",
    "submit_scheduled",
]
