"""Group commit (worker.commits) against the real PostgreSQL, with real threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Connection, text

from jobs.db import transaction
from tests.integration.throttle_helpers import wait_until
from worker.commits import GroupCommit

pytestmark = pytest.mark.integration


@pytest.fixture
def probe(clean_db: str) -> Iterator[str]:
    """A table the steps write their keys to."""
    with transaction(clean_db) as tx:
        tx.execute(text("CREATE TABLE commit_probe (k int PRIMARY KEY, txid bigint)"))
    yield clean_db
    with transaction(clean_db) as tx:
        tx.execute(text("DROP TABLE commit_probe"))


def write(key: int, order: list[int]) -> Callable[[Connection], int]:
    def step(tx: Connection) -> int:
        order.append(key)
        txid = tx.execute(text("SELECT txid_current()")).scalar_one()
        tx.execute(text("INSERT INTO commit_probe VALUES (:k, :t)"), {"k": key, "t": txid})
        return int(txid)

    return step


def held_group(
    commits: GroupCommit, first: Callable[[Connection], int], rest: dict[int, Callable[..., int]]
) -> dict[int, int | BaseException]:
    """Run ``first`` alone, and while it is being written queue ``rest``, which then go in
    the next transaction together; each key's result or error."""
    results: dict[int, int | BaseException] = {}
    writing, go_on = threading.Event(), threading.Event()

    def held(tx: Connection) -> int:
        writing.set()
        assert go_on.wait(10)
        return first(tx)

    def run(key: int, step: Callable[[Connection], int]) -> None:
        try:
            results[key] = commits.run(key, step)
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            results[key] = exc

    threads = [threading.Thread(target=run, args=(0, held))]
    threads[0].start()
    assert writing.wait(10)
    for key, step in rest.items():
        threads.append(threading.Thread(target=run, args=(key, step)))
        threads[-1].start()
    # Every other step is queued behind the one being written.
    wait_until(lambda: len(commits._queued) == len(rest))
    go_on.set()
    for thread in threads:
        thread.join(10)
    return results


def test_steps_queued_behind_a_write_commit_together_in_key_order(probe: str) -> None:
    commits = GroupCommit(probe)
    order: list[int] = []
    results = held_group(commits, write(0, order), {k: write(k, order) for k in (7, 3, 9, 1)})
    assert order == [0, 1, 3, 7, 9]
    assert len({results[k] for k in (1, 3, 7, 9)}) == 1  # one transaction
    assert results[0] != results[1]
    with transaction(probe) as tx:
        rows = dict(tx.execute(text("SELECT k, txid FROM commit_probe")).all())
    assert rows == results


def test_a_failing_step_fails_alone_and_writes_nothing(probe: str) -> None:
    commits = GroupCommit(probe)
    order: list[int] = []

    def bad(tx: Connection) -> int:
        write(2, order)(tx)
        raise ValueError("step 2 is wrong")

    results = held_group(commits, write(0, order), {1: write(1, order), 2: bad, 3: write(3, order)})
    assert isinstance(results[2], ValueError)
    assert isinstance(results[1], int) and isinstance(results[3], int)
    # Run again one by one: a transaction each.
    assert results[1] != results[3]
    with transaction(probe) as tx:
        keys = sorted(tx.execute(text("SELECT k FROM commit_probe")).scalars())
    assert keys == [0, 1, 3]
    # A step alone, in a commit with nothing queued behind it, still returns its own result.
    assert commits.run(5, lambda tx: int(tx.execute(text("SELECT 5")).scalar_one())) == 5
