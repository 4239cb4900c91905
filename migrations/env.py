"""Alembic environment: the URL comes from the caller or from DATABASE_URL.

``jobs.migrate`` passes the URL it was given; the ``alembic`` command line reads
DATABASE_URL, the same variable (and the same rewriting) as every other process.
Nothing here starts a server.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from jobs.models import Base
from jobs.settings import ConfigError, Settings

target_metadata = Base.metadata


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from_env = Settings.from_env().database_url
    if from_env is None:
        raise ConfigError("DATABASE_URL is not set: point it at the database to migrate")
    return from_env


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
