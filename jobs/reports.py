"""Usage reports from the attempts ledger: calls and tokens by day, batch and model."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Date, case, cast, func, select

from jobs.db import session_scope
from jobs.models import Attempt, Job


@dataclass(frozen=True)
class UsageRow:
    """Ledger totals for one (day, batch, model)."""

    day: dt.date
    batch_id: int | None
    model: str
    calls: int
    ok_calls: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["day"] = self.day.isoformat()
        return data


def usage(
    database_url: str, *, since: dt.date | None = None, batch_id: int | None = None
) -> list[UsageRow]:
    """Every call the ledger holds, summed by UTC day, batch and model."""
    day = cast(func.timezone("UTC", Attempt.started_at), Date).label("day")
    stmt = (
        select(
            day,
            Job.batch_id,
            Attempt.model,
            func.count().label("calls"),
            func.sum(case((Attempt.http_status == 200, 1), else_=0)).label("ok_calls"),
            func.sum(Attempt.prompt_tokens).label("prompt_tokens"),
            func.sum(Attempt.completion_tokens).label("completion_tokens"),
            func.sum(Attempt.total_tokens).label("total_tokens"),
        )
        .join(Job, Job.id == Attempt.job_id)
        .group_by(day, Job.batch_id, Attempt.model)
        .order_by(day, Job.batch_id, Attempt.model)
    )
    if since is not None:
        stmt = stmt.where(Attempt.started_at >= dt.datetime.combine(since, dt.time(), dt.UTC))
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    with session_scope(database_url) as session:
        return [
            UsageRow(
                day=row.day,
                batch_id=row.batch_id,
                model=row.model,
                calls=int(row.calls),
                ok_calls=int(row.ok_calls),
                prompt_tokens=int(row.prompt_tokens),
                completion_tokens=int(row.completion_tokens),
                total_tokens=int(row.total_tokens),
            )
            for row in session.execute(stmt)
        ]
