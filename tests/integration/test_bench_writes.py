"""``python -m bench.grouped_writes`` against the real PostgreSQL: both ways end every
job succeeded, with the attempt recorded, so its figures compare the same work."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from bench.grouped_writes import measure
from jobs.db import session_scope
from jobs.models import Attempt, Job, JobStatus

pytestmark = pytest.mark.integration


def test_grouped_and_single_writes_leave_the_same_rows(clean_db: str) -> None:
    found = measure(clean_db, 40, 10)
    assert set(found) == {
        "claim_per_job",
        "claim_per_10",
        "attempt_per_job",
        "result_per_job",
        "result_per_10",
    }
    assert all(ms > 0 for ms in found.values()), found
    with session_scope(clean_db) as s:
        ended = s.execute(
            select(Job.status, func.count(), func.sum(Job.total_tokens)).group_by(Job.status)
        ).all()
        recorded = s.execute(
            select(func.count()).select_from(Attempt).where(Attempt.http_status == 200)
        ).scalar_one()
    assert [(status, n, tokens) for status, n, tokens in ended] == [
        (JobStatus.SUCCEEDED, 40, 40 * 26)
    ]
    assert recorded == 40
