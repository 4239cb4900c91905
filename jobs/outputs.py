"""A batch's results as OpenAI Batch output lines: its output file and its error file.

OpenAI splits them the same way:

* **output**: each succeeded request, in input order:
  ``response: {status_code: 200, request_id, body}`` and ``error: null``;
* **errors**: every other finished request, in input order. A request the provider
  refused with an HTTP answer (a 4xx) keeps that answer,
  ``response: {status_code, request_id, body}`` with ``error: null``; one that ended
  with no HTTP answer to show (a timeout, retries used up, cancelled, expired) has
  ``response: null`` and ``error: {code, message}`` (``batch_cancelled``,
  ``batch_expired``, ``timeout``...).

``request_id`` is the provider's own request id (its ``x-request-id`` header) when it
sent one, else ``null``.

A succeeded request whose bodies data retention deleted keeps a line that still reads
as a chat completion: the same ``status_code`` 200, a body with no ``choices`` but its
``usage`` (the ledger keeps the token counts), and ``error: {code: "purged",
message}`` saying when.

The files are not stored twice: :func:`render` writes them from the jobs each time
they are read, and :func:`size` counts their bytes when the batch ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from jobs.db import session_scope
from jobs.models import TERMINAL, FileRole, Job, JobStatus

#: Error code of the line of a succeeded job whose bodies retention deleted.
PURGED_CODE = "purged"
#: Jobs read from Postgres at a time.
PAGE = 1000


def line_id(job_id: int) -> str:
    """The ``id`` of a job's output line (OpenAI's are ``batch_req_…``)."""
    return f"batch_req_{job_id}"


def job_line(job: Job) -> dict[str, Any]:
    """The OpenAI Batch output line of a finished job (see the module docstring)."""
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if job.status == JobStatus.SUCCEEDED:
        body = job.response
        if job.purged_at is not None or body is None:
            body = _purged_body(job)
            stamp = job.purged_at.isoformat() if job.purged_at else "an unknown time"
            error = {
                "code": PURGED_CODE,
                "message": f"response body deleted by data retention at {stamp}",
            }
        response = {"status_code": 200, "request_id": job.request_id, "body": body}
    elif job.error_status is not None:
        body = job.error_body or {"error": {"message": job.last_error or "", "type": "error"}}
        response = {"status_code": job.error_status, "request_id": job.request_id, "body": body}
    else:
        error = {
            "code": job.error_code or job.status,
            "message": job.last_error or f"job {job.status}",
        }
    return {"id": line_id(job.id), "custom_id": job.custom_id, "response": response, "error": error}


def _purged_body(job: Job) -> dict[str, Any]:
    finished = job.finished_at or job.created_at
    return {
        "id": f"chatcmpl-purged-{job.id}",
        "object": "chat.completion",
        "created": int(finished.timestamp()),
        "model": job.model,
        "choices": [],
        "usage": {
            "prompt_tokens": job.prompt_tokens or 0,
            "completion_tokens": job.completion_tokens or 0,
            "total_tokens": job.total_tokens or 0,
        },
    }


def encode(line: dict[str, Any]) -> bytes:
    """One line of a JSONL file: compact JSON and a newline."""
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def lines(database_url: str, batch_id: int, role: FileRole | None) -> Iterator[dict[str, Any]]:
    """The output lines of a batch's finished jobs, in input order.

    ``role`` picks the output file's (``FileRole.OUTPUT``) or the error file's
    (``FileRole.ERROR``); ``None`` gives both, merged in input order.
    """
    if role == FileRole.OUTPUT:
        wanted: tuple[str, ...] = (JobStatus.SUCCEEDED,)
    elif role == FileRole.ERROR:
        wanted = (JobStatus.FAILED, JobStatus.CANCELLED)
    else:
        wanted = TERMINAL
    last_id = 0
    while True:
        with session_scope(database_url) as session:
            jobs = (
                session.execute(
                    select(Job)
                    .where(Job.batch_id == batch_id, Job.id > last_id, Job.status.in_(wanted))
                    .order_by(Job.id)
                    .limit(PAGE)
                )
                .scalars()
                .all()
            )
        if not jobs:
            return
        for job in jobs:
            yield job_line(job)
        last_id = jobs[-1].id


def render(database_url: str, batch_id: int, role: FileRole) -> Iterator[bytes]:
    """The bytes of a batch's output or error file, a page of lines at a time."""
    buffer: list[bytes] = []
    for line in lines(database_url, batch_id, role):
        buffer.append(encode(line))
        if len(buffer) >= PAGE:
            yield b"".join(buffer)
            buffer.clear()
    if buffer:
        yield b"".join(buffer)


def size(database_url: str, batch_id: int, role: FileRole) -> tuple[int, int]:
    """``(lines, bytes)`` of a batch's output or error file."""
    count = total = 0
    for line in lines(database_url, batch_id, role):
        count += 1
        total += len(encode(line))
    return count, total
