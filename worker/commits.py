"""Group commit: the writes of many job threads, committed in one transaction.

A busy worker ends jobs many times a second, each with a short transaction of its
own: a pooled connection (checked with a round trip), a few statements, a commit.
Threads that arrive while a transaction is being written wait for it, and the first
of them then writes all of theirs in the next one:

1. a thread queues its step and, if no thread is writing, becomes the writer;
2. the writer takes every queued step, in the order of their keys (job ids: the lock
   order of cancels, so two writers never wait on each other in a circle), and runs
   them in one transaction;
3. if that transaction fails, each of its steps is run again alone, so that an error
   reaches only the thread whose step raised it; an outage (:data:`OUTAGES`) reaches
   every one at once, and each caller retries it as before;
4. each thread gets its own step's result once its transaction has committed: a call
   recorded here is recorded before the thread goes on, as with a transaction of its
   own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection

from jobs.db import transaction
from worker.outages import OUTAGES

T = TypeVar("T")


@dataclass
class _Step:
    key: int
    run: Callable[[Connection], Any]
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class GroupCommit:
    """Steps of many threads on one database, committed together; one per process."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._changed = threading.Condition()
        self._queued: list[_Step] = []
        self._writing = False

    def run(self, key: int, step: Callable[[Connection], T]) -> T:
        """Run ``step`` in a transaction shared with other threads' steps (steps 1-4)."""
        mine = _Step(key, step)
        with self._changed:
            self._queued.append(mine)
            while self._writing and not mine.done:
                self._changed.wait()
            if not mine.done:
                # Nobody writes: this thread writes every queued step, its own included.
                self._writing = True
                group, self._queued = sorted(self._queued, key=lambda s: s.key), []
        if not mine.done:
            try:
                self._write(group)
            except BaseException as exc:
                # Not an error of the steps (an interrupt): none of them may wait on.
                for queued in group:
                    if not queued.done:
                        queued.error, queued.done = exc, True
                raise
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[no-any-return]

    def _write(self, group: list[_Step]) -> None:
        try:
            with transaction(self._url) as tx:
                results = [step.run(tx) for step in group]
        except OUTAGES as exc:
            # The database is away, not a step wrong: every caller retries for itself.
            for step in group:
                step.error, step.done = exc, True
            return
        except Exception as exc:  # noqa: BLE001 - handed to the step's thread
            if len(group) > 1:
                for step in group:
                    self._write([step])
                return
            group[0].error = exc
            results = [None]
        for step, result in zip(group, results, strict=True):
            step.result, step.done = result, True
