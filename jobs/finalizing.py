"""Ending a batch once nothing of it is queued or running (a worker's task).

The dispatcher's sweep publishes this task for every batch that is ``finalizing``
(its last job ended, or its window closed) or ``cancelling`` with nothing left in
flight. Each run locks the batch, counts the bytes of its output and error files
(rendered from its jobs, :mod:`jobs.outputs`), and sets its final status with
:func:`jobs.store.end_batch`: ``completed``, ``expired`` or ``cancelled``, the
webhook event of that status in the same transaction.
"""

from __future__ import annotations

from jobs import outputs, store
from jobs.db import session_scope
from jobs.logfmt import log_event
from jobs.models import BatchStatus, FileRole
from jobs.settings import Settings


def finalize(settings: Settings, batch_id: int) -> BatchStatus | None:
    """End one batch; ``None`` when it is not ready (or another worker is ending it)."""
    assert settings.database_url is not None
    url = settings.database_url
    with session_scope(url) as session:
        if not store.lock_finalizable(session, batch_id):
            return None
        found = []
        for role, suffix in ((FileRole.OUTPUT, "output"), (FileRole.ERROR, "error")):
            count, size = outputs.size(url, batch_id, role)
            if count:
                name = f"batch_{batch_id}_{suffix}.jsonl"
                found.append(store.BatchFile(store.new_id("file-"), role, name, size))
        final = store.end_batch(session, batch_id, found, notify=settings.webhook_url is not None)
    log_event("batch_ended", batch=batch_id, status=final.value, files=len(found))
    return final
