"""Reports from the attempts ledger: calls, tokens and dollars by day, batch, model and
attachment, and the calls of the last window (to re-seed a lost throttle bucket)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Date, case, cast, func, or_, select, true
from sqlalchemy.orm import Session

from jobs.db import session_scope
from jobs.models import Attempt, Job
from jobs.pricing import Price


@dataclass(frozen=True)
class UsageRow:
    """Ledger totals for one (day, batch, model, attachment)."""

    day: dt.date
    batch_id: int | None
    model: str
    calls: int
    ok_calls: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: What those tokens cost, ``None`` where the model has no price.
    usd: float | None = None
    #: The attachment's alias (:mod:`jobs.attachments`); ``None``: calls made before
    #: the ledger recorded it.
    attachment: str | None = None
    #: Its key's hash: two keys behind one alias over time stay apart.
    key_hash: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["day"] = self.day.isoformat()
        return data


def usage(
    database_url: str,
    *,
    since: dt.date | None = None,
    batch_id: int | None = None,
    price_for: Callable[[str], Price | None] = lambda _model: None,
) -> list[UsageRow]:
    """Every call the ledger holds, summed by UTC day, batch, model and attachment,
    priced by ``price_for(model)``."""
    day = cast(func.timezone("UTC", Attempt.started_at), Date).label("day")
    stmt = (
        select(
            day,
            Job.batch_id,
            Attempt.model,
            Attempt.attachment,
            Attempt.key_hash,
            func.count().label("calls"),
            func.sum(case((Attempt.http_status == 200, 1), else_=0)).label("ok_calls"),
            func.sum(Attempt.prompt_tokens).label("prompt_tokens"),
            func.sum(Attempt.completion_tokens).label("completion_tokens"),
            func.sum(Attempt.total_tokens).label("total_tokens"),
        )
        .join(Job, Job.id == Attempt.job_id)
        .group_by(day, Job.batch_id, Attempt.model, Attempt.attachment, Attempt.key_hash)
        .order_by(day, Job.batch_id, Attempt.model, Attempt.attachment, Attempt.key_hash)
    )
    if since is not None:
        stmt = stmt.where(Attempt.started_at >= dt.datetime.combine(since, dt.time(), dt.UTC))
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    with session_scope(database_url) as session:
        rows = session.execute(stmt).all()
    found = []
    for row in rows:
        price = price_for(row.model)
        prompt, completion = int(row.prompt_tokens), int(row.completion_tokens)
        found.append(
            UsageRow(
                day=row.day,
                batch_id=row.batch_id,
                model=row.model,
                calls=int(row.calls),
                ok_calls=int(row.ok_calls),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=int(row.total_tokens),
                usd=price.usd(prompt, completion) if price else None,
                attachment=row.attachment,
                key_hash=row.key_hash,
            )
        )
    return found


@dataclass(frozen=True)
class RecentCall:
    """A call the ledger saw start within the last window (to re-seed a lost bucket)."""

    age_s: float
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int | None
    answered: bool


def recent_calls(
    session: Session, *, window_s: float, model: str, key_hash: str | None = None
) -> list[RecentCall]:
    """Calls of ``model`` started in the last ``window_s`` seconds, by the database's
    clock; with ``key_hash``, only those made with that key (and those of before the
    ledger recorded keys, which went through the one key of old).

    A call still in flight has no usage yet: its job's prompt estimate stands in.
    """
    by_key = (
        or_(Attempt.key_hash == key_hash, Attempt.key_hash.is_(None))
        if key_hash is not None
        else true()
    )
    age = func.extract("epoch", func.now() - Attempt.started_at)
    rows = session.execute(
        select(
            age,
            Attempt.http_status,
            Attempt.prompt_tokens,
            Attempt.completion_tokens,
            Job.est_prompt_tokens,
            func.coalesce(
                Job.request["max_completion_tokens"].as_integer(),
                Job.request["max_tokens"].as_integer(),
            ),
        )
        .join(Job, Job.id == Attempt.job_id)
        .where(Attempt.model == model, by_key)
        .where(Attempt.started_at > func.now() - dt.timedelta(seconds=window_s))
        # A 429 was not admitted by the provider and holds no place in its window.
        .where(or_(Attempt.http_status.is_(None), Attempt.http_status != 429))
    )
    return [
        RecentCall(
            age_s=float(age_s),
            prompt_tokens=prompt if status is not None and prompt else est,
            completion_tokens=completion,
            max_tokens=max_tokens,
            answered=status is not None,
        )
        for age_s, status, prompt, completion, est, max_tokens in rows
    ]
