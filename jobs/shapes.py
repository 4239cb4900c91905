"""Our batches and files as OpenAI's objects, field for field.

What :mod:`web` returns must validate as the ``openai`` SDK's own types
(``openai.types.Batch``, ``FileObject``, ``BatchRequestCounts``, ``BatchUsage``):
times are Unix seconds, ids are ``batch_…`` and ``file-…``, and a batch's usage
comes from the attempts ledger (every call the provider answered, retries included).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from jobs.db import session_scope
from jobs.models import Attempt, Batch, File, Job
from jobs.pricing import Price
from jobs.store import Counts

#: A batch's public id is this prefix and its number.
BATCH_PREFIX = "batch_"
#: What ``completion_window`` says of a batch with none (the CLI's, nightly runs).
NO_WINDOW = "none"


def batch_public_id(batch_id: int) -> str:
    return f"{BATCH_PREFIX}{batch_id}"


def parse_batch_id(text: str) -> int | None:
    """The number of ``batch_12`` (or of a bare ``12``); ``None`` if it is not one."""
    digits = text.removeprefix(BATCH_PREFIX).removeprefix("batch-")
    if not digits.isascii() or not digits.isdigit() or int(digits) < 1:
        return None
    # A number past Postgres's bigint is a batch that does not exist, not a bad id.
    return int(digits)


def _unix(moment: dt.datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def file_object(file: File) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": _unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(
    batch: Batch,
    *,
    counts: Counts,
    model: str | None,
    usage: dict[str, Any],
    usd: float | None = None,
) -> dict[str, Any]:
    errors = {"object": "list", "data": [_error(e) for e in batch.errors]} if batch.errors else None
    return {
        "id": batch_public_id(batch.id),
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id or "",
        "completion_window": batch.completion_window or NO_WINDOW,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _unix(batch.created_at),
        "in_progress_at": _unix(batch.in_progress_at),
        "expires_at": _unix(batch.expires_at),
        "finalizing_at": _unix(batch.finalizing_at),
        "completed_at": _unix(batch.completed_at),
        "failed_at": _unix(batch.failed_at),
        "expired_at": _unix(batch.expired_at),
        "cancelling_at": _unix(batch.cancelling_at),
        "cancelled_at": _unix(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": counts.succeeded,
            # OpenAI counts a cancelled or expired request as failed.
            "failed": counts.failed + counts.cancelled,
        },
        "metadata": {str(k): str(v) for k, v in batch.meta.items()} or None,
        "model": model,
        "usage": usage,
        # Not OpenAI's: what the usage cost, from the configured price (null: no price).
        "usage_usd": usd,
        # Not OpenAI's either, whose statuses are a fixed list: a batch whose budget ran
        # out stays in_progress, and says why its calls are paused (null: they are not).
        "paused_reason": batch.paused_reason,
    }


def _error(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "code": error.get("code"),
        "line": error.get("line"),
        "message": error.get("message"),
        "param": error.get("param"),
    }


def batch_usage(
    database_url: str,
    batch_ids: list[int],
    price_for: Callable[[str], Price | None] = lambda _model: None,
) -> dict[int, dict[str, Any]]:
    """Ledger usage, its cost and the model of each batch, priced by ``price_for(model)``:
    ``{id: {"usage": {...}, "model": ..., "usd": ..., "attachments": {...}}}`` (``usd``
    ``None``: no price; ``attachments``: alias -> (calls, tokens), :func:`attachment_split`)."""
    found: dict[int, dict[str, Any]] = {
        i: {"usage": usage_object(0, 0), "model": None, "usd": None, "attachments": {}}
        for i in batch_ids
    }
    if not batch_ids:
        return found
    with session_scope(database_url) as session:
        rows = session.execute(
            select(
                Job.batch_id,
                Attempt.model,
                func.coalesce(func.sum(Attempt.prompt_tokens), 0),
                func.coalesce(func.sum(Attempt.completion_tokens), 0),
                func.min(Job.model),
                Attempt.attachment,
                func.count(Attempt.job_id),
            )
            .outerjoin(Attempt, Attempt.job_id == Job.id)
            .where(Job.batch_id.in_(batch_ids))
            .group_by(Job.batch_id, Attempt.model, Attempt.attachment)
        ).all()
    tokens: dict[int, tuple[int, int]] = {}
    cost: dict[int, float] = {}
    unpriced: set[int] = set()
    for row in rows:
        batch_id, called, prompt, completion, model, alias, calls = row
        assert batch_id is not None  # the jobs of these batches
        found[batch_id]["model"] = found[batch_id]["model"] or model
        if calls:
            alias = alias or "(before attachments were recorded)"
            was = found[batch_id]["attachments"].get(alias, (0, 0))
            found[batch_id]["attachments"][alias] = (
                was[0] + int(calls),
                was[1] + int(prompt) + int(completion),
            )
        before = tokens.get(batch_id, (0, 0))
        tokens[batch_id] = (before[0] + int(prompt), before[1] + int(completion))
        # Each call is priced as the model it called; a batch without calls as its own.
        price = price_for(called or model)
        if price is None:
            unpriced.add(batch_id)
        else:
            cost[batch_id] = cost.get(batch_id, 0.0) + price.usd(int(prompt), int(completion))
    for batch_id, (prompt, completion) in tokens.items():
        found[batch_id]["usage"] = usage_object(prompt, completion)
        found[batch_id]["usd"] = None if batch_id in unpriced else cost[batch_id]
    return found


def attachment_split(attachments: dict[str, tuple[int, int]]) -> str | None:
    """A batch's calls and tokens per attachment (:func:`batch_usage`), busiest first:
    ``INFERENCE 455 calls, 520,100 tokens; INFERENCE_2 145 calls, 165,800 tokens``;
    ``None`` with one attachment or none, where a split says nothing."""
    if len(attachments) < 2:
        return None
    busiest = sorted(attachments.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return "; ".join(f"{alias} {c:,} calls, {t:,} tokens" for alias, (c, t) in busiest)


def usage_object(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
