"""The schema built by ``alembic upgrade head`` is the schema the models declare."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from jobs import migrate
from jobs.models import Base
from jobs.settings import Settings
from tests.support import create_database, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_database(base_settings: Settings) -> Iterator[str]:
    assert base_settings.database_url is not None
    url = create_database(base_settings.database_url, prefix="bi_migr")
    yield url
    drop_database(url)


def test_upgrade_head_matches_models(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_migrated_schema_equals_create_all(empty_database: str, base_settings: Settings) -> None:
    assert base_settings.database_url is not None
    other = create_database(base_settings.database_url, prefix="bi_meta")
    try:
        migrate.upgrade(empty_database)
        meta_engine = create_engine(other)
        Base.metadata.create_all(meta_engine)
        migrated_engine = create_engine(empty_database)
        try:
            assert _schema(migrated_engine) == _schema(meta_engine)
        finally:
            meta_engine.dispose()
            migrated_engine.dispose()
    finally:
        drop_database(other)


def _schema(engine: object) -> dict[str, object]:
    insp = inspect(engine)
    tables = sorted(t for t in insp.get_table_names() if t != "alembic_version")
    return {
        table: {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in insp.get_columns(table)
            ],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"], str(fk.get("options")))
                for fk in insp.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    i["unique"],
                    str(i.get("dialect_options", {})),
                )
                for i in insp.get_indexes(table)
            ),
            "uniques": sorted(
                (u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(table)
            ),
            "checks": sorted((c["name"], c["sqltext"]) for c in insp.get_check_constraints(table)),
        }
        for table in tables
    }


def test_downgrade_to_base_and_back(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    migrate.downgrade(empty_database, "base")
    engine = create_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    migrate.upgrade(empty_database)
