"""Run Alembic migrations programmatically (``python -m jobs migrate``, Procfile ``release``),
and tell whether a database's schema is the one this code needs.

The scripts are found as a resource of the ``migrations`` package (Alembic's
``package:path`` location), so ``jobs`` never imports ``migrations``; only
``migrations/env.py`` imports ``jobs`` (for the models).
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import ProgrammingError

#: Where Alembic finds the migration scripts: the ``migrations`` package's own folder.
SCRIPT_LOCATION = "migrations:."
#: What a user runs to bring the schema up to date.
MIGRATE_COMMAND = "python -m jobs migrate"


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic config that needs no alembic.ini: script location from the package."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if database_url is not None:
        # ConfigParser interpolation treats % specially (URL-encoded passwords).
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision of the scripts this code ships with."""
    head = _scripts().get_current_head()
    assert head is not None, "the migrations package has no revisions"
    return head


def schema_problem(connection: Connection) -> str | None:
    """Why the connected database cannot be used by this code, or ``None`` when it can.

    A database with no schema, or one at an older (or unknown) revision, is a
    user's fix, not a crash: the answer names the command that fixes it.
    """
    try:
        with connection.begin_nested():
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except ProgrammingError:
        current = None
    scripts = _scripts()
    head = scripts.get_current_head()
    if current is None:
        return f"the database has no schema yet: run `{MIGRATE_COMMAND}`"
    if current not in {script.revision for script in scripts.walk_revisions()}:
        return (
            f"the database schema is at revision {current}, which this code does not know "
            f"(its newest is {head}): deploy the release that migrated it"
        )
    if current != head:
        return (
            f"the database schema is at revision {current}, this code needs {head}: "
            f"run `{MIGRATE_COMMAND}`"
        )
    return None
