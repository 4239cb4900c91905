"""Ledger rows written through the ledger's own functions, for tests that need answered
calls without making them (calibration, dry runs)."""

from __future__ import annotations

import itertools
from typing import Any

from jobs import intake, store
from jobs.batchfile import BatchItem
from jobs.db import session_scope, transaction
from jobs.models import Priority
from jobs.tokens import Script, dominant_script
from jobs.validation import CheckedRequest

_ids = itertools.count()


def body(text: str, model: str = "kimi-k2-5") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def answered(db: str, request: dict[str, Any], raw: int, actual: int, **extra: int) -> None:
    """One answered call of a new job (see :func:`answer`, which takes ``extra``)."""
    checked = CheckedRequest(
        body=request, model=request["model"], max_tokens=None, est_prompt_tokens=raw
    )
    with session_scope(db) as s:
        job_id = intake.create_job(
            s,
            BatchItem(line=1, custom_id=f"c{next(_ids)}", request=checked),
            priority=Priority.BULK,
        )
    answer(db, job_id, request, raw, actual, **extra)


def answer(
    db: str,
    job_id: int,
    request: dict[str, Any],
    raw: int,
    actual: int,
    *,
    completion: int = 1,
    max_tokens: int | None = None,
    latency_ms: int = 5,
) -> None:
    """Job ``job_id`` claimed, called and succeeded through the ledger's own writes:
    priced from ``raw``, charged ``actual`` prompt tokens and ``completion`` of its
    ``max_tokens``."""
    script: Script = dominant_script(request)
    with transaction(db) as tx:
        assert store.claim(tx, job_id, lease_s=60) is not None
        number = store.begin_attempt(
            tx, job_id, lease_s=60, est_prompt_tokens=raw, script=script, max_tokens=max_tokens
        )
        assert number is not None
        usage = (actual, completion, actual + completion)
        store.finish_attempt(
            tx, job_id, number, latency_ms=latency_ms, http_status=200, usage=usage
        )
        store.record_success(
            tx,
            job_id,
            response={},
            output_text="",
            reasoning_text=None,
            tool_calls=None,
            finish_reason="stop",
            usage=usage,
        )
