"""Webhooks: a signed event POSTed to WEBHOOK_URL when a batch ends, at least once.

1. A batch's final status and its event row (``webhook_events``, ``evt_…``) are written
   in one transaction (:func:`jobs.store.end_batch`, :func:`jobs.store.reject_batch`):
   an ended batch always has its event, and an end rolled back has none.
2. Each dispatcher sweep (:mod:`jobs.housekeeping`) claims the due events and publishes
   one ``deliver_webhook`` task each (:func:`publish_due`). One UPDATE picks them
   ``FOR UPDATE SKIP LOCKED`` and moves their ``next_attempt_at`` :data:`CLAIM_S`
   ahead, so the sweep of another worker neither waits for them nor picks them again;
   an event whose task died with its worker is due again once the claim runs out.
3. The task takes its attempt (:func:`deliver`): ``attempts`` goes from n to n + 1
   once, however many copies of its message run, so no attempt is sent twice. It
   builds the body, signs it with the time of this attempt, POSTs it with a
   :data:`TIMEOUT_S` timeout, and records the outcome in the row: a 2xx sets
   ``delivered_at``; any other status (``last_status``), a refused connection or a
   timeout (``last_error``) makes the next attempt due after a backoff.

Backoff: after failed attempt n the next is due ``WEBHOOK_BACKOFF_BASE * 2^(n-1)``
seconds later, at most WEBHOOK_BACKOFF_MAX, with equal jitter (uniform over the upper
half, so many events do not return to a receiver in lockstep), and is sent by the
first sweep after that (DISPATCH_INTERVAL). With the defaults: 2.5-5 s, 5-10 s,
10-20 s … then 30-60 min, for :data:`RETRY_FOR` (72 hours, as OpenAI) after the
event; then the row keeps its last error, ``webhook_abandoned`` is logged, and
nothing more is sent.

The format is Standard Webhooks', as OpenAI's: the body ``{"id", "object": "event",
"type", "created_at", "data": {"id": "batch_12"}}``, and the headers ``webhook-id``
(the event's id, the same on every attempt: receivers deduplicate on it, since a
worker killed between the receiver's 2xx and the record sends it again),
``webhook-timestamp`` and ``webhook-signature`` (:func:`sign`). Each attempt is
signed afresh: the ``openai`` SDK refuses a timestamp older than 5 minutes, and a
receiver down for hours must still be able to verify the event it finally gets.

Neither the secret nor the URL (which may carry a token) is ever logged or stored.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Literal, cast

import httpx
from celery import Celery
from sqlalchemy import Table, func, select, update

from jobs.constants import QUEUE_CONTROL, TASK_DELIVER_WEBHOOK
from jobs.db import transaction
from jobs.logfmt import log_event
from jobs.models import WebhookEvent
from jobs.settings import Settings
from jobs.shapes import batch_public_id
from jobs.store import Tx

_events = cast(Table, WebhookEvent.__table__)

#: Seconds a claimed event is left to its task before a sweep claims it again: the
#: task's wait in the control queue plus one attempt (:data:`TIMEOUT_S`), with room.
CLAIM_S = 60.0
#: Seconds one POST may take to connect, and to send or get each part of it. A
#: receiver is expected to answer at once and do its work later.
CONNECT_TIMEOUT_S = 5.0
TIMEOUT_S = 10.0
#: How long after the event attempts go on (OpenAI retries for 72 hours too).
RETRY_FOR = dt.timedelta(hours=72)
#: Events claimed by one sweep; the rest wait for the next.
CLAIM_LIMIT = 100
#: Longest ``last_error`` kept.
ERROR_CHARS = 200

Outcome = Literal["delivered", "failed", "skipped"]

_RNG = random.Random()


# -- the format ------------------------------------------------------------------------


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret: its base64 part, decoded."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{event_id}.{timestamp}.{body}">``, Standard Webhooks'."""
    mac = hmac.new(secret_key(secret), f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def event_body(event_id: str, event_type: str, created_at: dt.datetime, batch_id: int) -> bytes:
    """The JSON body of an event, compact: the bytes signed are the bytes sent."""
    payload = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(created_at.timestamp()),
        "data": {"id": batch_public_id(batch_id)},
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def signed_headers(secret: str, event_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers of one attempt, signed for ``timestamp`` (Unix seconds)."""
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, event_id, timestamp, body),
    }


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds from failed attempt number ``attempts`` to the next (see the docstring)."""
    # 2**40 base-seconds dwarfs any cap; stopping there keeps the float math finite.
    bound = min(cap, base * 2.0 ** min(attempts - 1, 40))
    return bound / 2 + _RNG.uniform(0, bound / 2)


# -- the sweep's part --------------------------------------------------------------------


def claim_due(session: Tx, *, limit: int = CLAIM_LIMIT) -> list[tuple[str, int]]:
    """Claim undelivered events whose attempt is due, as ``(id, attempts so far)``.

    Their ``next_attempt_at`` moves :data:`CLAIM_S` ahead in the same statement that
    picks them, and rows another sweep holds are skipped, not waited for.
    """
    e = _events.c
    due = (
        select(e.id)
        .where(
            e.delivered_at.is_(None),
            e.next_attempt_at <= func.now(),
            e.created_at > func.now() - RETRY_FOR,
            # A batch is never deleted; an event without one would have nothing to name.
            e.batch_id.is_not(None),
        )
        .order_by(e.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(_events)
        .where(e.id.in_(due))
        .values(next_attempt_at=func.now() + dt.timedelta(seconds=CLAIM_S))
        .returning(e.id, e.attempts)
    )
    return [(event_id, attempts) for event_id, attempts in rows]


def publish_due(settings: Settings, app: Celery) -> int:
    """Claim the due events and publish a delivery task for each; returns how many.

    The tasks are published before the claim commits: a failed publish rolls the
    claim back, and the events are due again at the next sweep.
    """
    assert settings.database_url is not None
    with transaction(settings.database_url) as tx:
        claimed = claim_due(tx)
        if claimed:
            with app.producer_or_acquire() as producer:
                for event_id, attempts in claimed:
                    app.send_task(
                        TASK_DELIVER_WEBHOOK,
                        args=[event_id, attempts],
                        queue=QUEUE_CONTROL,
                        producer=producer,
                    )
    return len(claimed)


# -- the task's part ---------------------------------------------------------------------


@dataclass(frozen=True)
class Taken:
    """An event whose attempt number ``attempt`` this task sends."""

    id: str
    type: str
    batch_id: int
    created_at: dt.datetime
    attempt: int


def take_attempt(session: Tx, event_id: str, attempts: int) -> Taken | None:
    """Count attempt ``attempts + 1`` of an undelivered event as this caller's, or ``None``.

    Only one caller moves ``attempts`` from ``attempts``: a copy of the same task
    message, or a task older than the event's last attempt, gets ``None``. The claim
    is renewed, so no sweep claims the event while this attempt is on the wire.
    """
    e = _events.c
    row = session.execute(
        update(_events)
        .where(
            e.id == event_id,
            e.attempts == attempts,
            e.delivered_at.is_(None),
            e.batch_id.is_not(None),
        )
        .values(
            attempts=e.attempts + 1,
            next_attempt_at=func.now() + dt.timedelta(seconds=CLAIM_S),
        )
        .returning(e.type, e.batch_id, e.created_at, e.attempts)
    ).one_or_none()
    if row is None:
        return None
    return Taken(event_id, row.type, row.batch_id, row.created_at, row.attempts)


def record_delivered(session: Tx, event_id: str, status: int) -> None:
    e = _events.c
    session.execute(
        update(_events)
        .where(e.id == event_id)
        .values(
            delivered_at=func.coalesce(e.delivered_at, func.now()),
            last_status=status,
            last_error=None,
        )
    )


def record_failed(
    session: Tx, taken: Taken, status: int | None, error: str | None, retry_in_s: float
) -> bool:
    """Record a failed attempt and when the next is due; ``False`` when there will be
    none (:data:`RETRY_FOR` is over by then).

    Nothing is written if the event was delivered meanwhile or a later attempt began
    (its attempt outlived its claim): the row keeps the newest outcome.
    """
    e = _events.c
    due = func.now() + dt.timedelta(seconds=retry_in_s)
    row = session.execute(
        update(_events)
        .where(e.id == taken.id, e.attempts == taken.attempt, e.delivered_at.is_(None))
        .values(last_status=status, last_error=error, next_attempt_at=due)
        .returning(e.next_attempt_at < e.created_at + RETRY_FOR)
    ).one_or_none()
    return row is None or bool(row[0])


class _HideUrl(logging.Filter):
    """Drops httpx's own INFO line of a POST to one URL: it quotes the URL, which may
    carry a token, and our ``webhook_*`` line says the rest."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = httpx.URL(url)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(arg, httpx.URL) and arg == self.url for arg in args)


_hidden: set[str] = set()
_hidden_lock = threading.Lock()


def _hide_from_logs(url: str) -> None:
    with _hidden_lock:
        if url not in _hidden:
            logging.getLogger("httpx").addFilter(_HideUrl(url))
            _hidden.add(url)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
    """POST one attempt: ``(status, None)`` when the receiver answered, else
    ``(None, why)``. The answer's body is never read: only its status counts."""
    _hide_from_logs(url)
    timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    # A client per attempt: deliveries are rare, and nothing outlives the task.
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as client,
            client.stream("POST", url, content=body, headers=headers) as response,
        ):
            return response.status_code, None
    except httpx.HTTPError as exc:
        # An httpx message may quote the URL, which may carry a token.
        message = str(exc).replace(url, "WEBHOOK_URL")
        return None, f"{type(exc).__name__}: {message}"[:ERROR_CHARS]


def deliver(settings: Settings, event_id: str, attempts: int) -> Outcome:
    """Send attempt ``attempts + 1`` of one event and record it (the task's body)."""
    url = settings.webhook_url
    assert settings.database_url is not None
    if url is None:
        # WEBHOOK_URL was removed after the event was queued: it waits for one again.
        return "skipped"
    with transaction(settings.database_url) as tx:
        taken = take_attempt(tx, event_id, attempts)
    if taken is None:
        return "skipped"
    body = event_body(taken.id, taken.type, taken.created_at, taken.batch_id)
    headers = signed_headers(settings.webhook_secret, taken.id, body, int(time.time()))
    status, error = post(url, body, headers)
    fields = {
        "event_id": taken.id,
        "type": taken.type,
        "batch": taken.batch_id,
        "attempt": taken.attempt,
        "http_status": status,
    }
    if status is not None and 200 <= status < 300:
        with transaction(settings.database_url) as tx:
            record_delivered(tx, taken.id, status)
        log_event("webhook_delivered", **fields)
        return "delivered"
    base, cap = settings.webhook_backoff_base, settings.webhook_backoff_max
    retry_in = retry_delay(taken.attempt, base, cap)
    with transaction(settings.database_url) as tx:
        again = record_failed(tx, taken, status, error, retry_in)
    if again:
        log_event("webhook_failed", **fields, error=error, retry_in_s=round(retry_in, 1))
    else:
        hours = RETRY_FOR.total_seconds() / 3600
        log_event("webhook_abandoned", **fields, error=error, after_hours=hours)
    return "failed"
