"""Alembic environment: the URL comes from the same settings as everything else."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from jobs.models import Base

target_metadata = Base.metadata


def _url() -> str:
    # A caller (jobs.migrate, the tests) may pass the URL explicitly; the
    # `alembic` command line falls back to DATABASE_URL or the embedded server.
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from jobs.embedded import resolve
    from jobs.settings import Settings

    resolved = resolve(Settings.from_env()).database_url
    assert resolved is not None
    return resolved


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url())
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
