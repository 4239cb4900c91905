"""Validating a Batches API batch's input file, in the background (a worker's task).

The web process answers ``POST /v1/batches`` at once with ``validating`` (Heroku's
router cuts a request at 30 s) and publishes this task; the dispatcher's sweep
publishes it again for a batch still ``validating`` a minute later (a web process
that died in between). Each run:

1. locks the batch while it is ``validating``; another run of the same batch, or a
   cancel, is waited out or skipped, so its jobs are stored once;
2. checks the endpoint, then the whole file with the batch validator, keeping every
   bad line (up to :data:`~jobs.batchfile.MAX_REPORTED_ERRORS`);
3. stores the jobs of a valid file with one COPY and starts the batch
   (``in_progress``), or fails it with the file's errors as
   ``[{code, line, message, param}]``; the file is read a second time for the COPY,
   so memory stays bounded.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import select

from jobs import files, intake, store
from jobs.api import request_limits
from jobs.batchfile import check_batch_stream, iter_batch_stream
from jobs.budget import budget_of, check_items
from jobs.db import session_scope
from jobs.logfmt import log_event
from jobs.models import CHAT_ENDPOINT, Batch
from jobs.settings import Settings
from jobs.validation import BatchValidationError, ValidationError

Outcome = Literal["accepted", "rejected", "skipped"]


def _error(exc: ValidationError) -> dict[str, Any]:
    code = "empty_file" if exc.reason == "file is empty" else "invalid_request"
    return {"code": code, "line": exc.line, "message": exc.reason, "param": exc.field}


def validate(settings: Settings, batch_id: int) -> Outcome:
    """Validate one batch's file and start or fail the batch (see the module docstring)."""
    assert settings.database_url is not None
    url = settings.database_url
    notify = settings.webhook_url is not None
    with session_scope(url) as session:
        if not store.lock_validating(session, batch_id):
            return "skipped"
        endpoint, file_id = session.execute(
            select(Batch.endpoint, Batch.input_file_id).where(Batch.id == batch_id)
        ).one()
        errors: list[dict[str, Any]] = []
        if endpoint != CHAT_ENDPOINT:
            message = f"endpoint must be {CHAT_ENDPOINT}, got {endpoint!r}"
            errors = [{"code": "invalid_endpoint", "line": None, "message": message}]
            errors[0]["param"] = "endpoint"
        elif file_id is None or files.get(url, file_id) is None:
            message = f"input file {file_id} does not exist (was it deleted?)"
            errors = [{"code": "file_not_found", "line": None, "message": message}]
            errors[0]["param"] = "input_file_id"
        else:
            limits = request_limits(settings)
            try:
                with files.open_input(url, file_id) as stream:
                    check_batch_stream(stream, limits)
                budget = budget_of(session, batch_id)
                if budget:
                    # Each request must fit the budget alone: one more pass, budgets only.
                    with files.open_input(url, file_id) as stream:
                        items = iter_batch_stream(stream, limits)
                        for _ in check_items(
                            items, budget, settings.default_max_tokens, settings.price_for
                        ):
                            pass
            except BatchValidationError as exc:
                errors = [_error(error) for error in exc.errors]
            except ValidationError as exc:
                errors = [_error(exc)]
        if errors:
            store.reject_batch(session, batch_id, errors, notify=notify)
            log_event("batch_failed", batch=batch_id, errors=len(errors))
            return "rejected"
        assert file_id is not None
        with files.open_input(url, file_id) as stream:
            intake.fill_batch(session, batch_id, iter_batch_stream(stream, limits))
    log_event("batch_validated", batch=batch_id)
    return "accepted"
