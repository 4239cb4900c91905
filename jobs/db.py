"""One SQLAlchemy engine per process, and short sessions per unit of work.

Engines are cached per (process, URL): a forked child never reuses its parent's
pooled connections. ``pool_pre_ping`` turns a connection killed by a Postgres
restart into a fresh one instead of an error in the middle of a job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}


def get_engine(url: str, *, pool_size: int = 5) -> Engine:
    """The process-wide engine for ``url``, created on first use."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                pool_recycle=1800,
                # Fail fast when Postgres is away; callers retry with backoff.
                connect_args={"connect_timeout": 10},
            )
            _engines[key] = engine
    return engine


def dispose_all() -> None:
    """Close every pooled connection of this process (used at shutdown and in tests)."""
    with _lock:
        for (pid, _url), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    factory = sessionmaker(get_engine(url), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


@contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """A Core connection in one transaction, committed on success, rolled back on error.

    For statements that need no ORM, such as the worker's per-job ones in
    :mod:`jobs.store`, where a session's bookkeeping is CPU spent for nothing.
    """
    with get_engine(url).begin() as connection:
        yield connection
