"""Migrations: upgrade creates the tables; ensure_current refuses an unmigrated database."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import databases
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conveyor import errors

from event_store import database, ensure_current, head_revision, migrate, models, upgrade


@pytest.fixture
def empty_url(db_kind: str) -> Iterator[str]:
    url = databases.create_empty(db_kind)
    yield url
    leaked = databases.open_connections(url)
    databases.drop(url)
    assert leaked == 0


async def test_ensure_current_empty_database_raises_with_command(empty_url: str) -> None:
    expected = rf"is not migrated \(at revision none, need {head_revision()}\): run `conveyor db upgrade`"
    with pytest.raises(errors.ConfigurationError, match=expected):
        await ensure_current(empty_url)


async def test_upgrade_empty_database_becomes_current(empty_url: str) -> None:
    await upgrade(empty_url)
    await ensure_current(empty_url)


async def test_upgrade_twice_is_idempotent(empty_url: str) -> None:
    await upgrade(empty_url)
    await upgrade(empty_url)
    await ensure_current(empty_url)


def _diff(connection: sa.Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_server_default": False})
    return [d for d in compare_metadata(context, models.metadata) if "conveyor_alembic_version" not in str(d)]


async def test_upgrade_creates_exactly_the_models_tables(empty_url: str) -> None:
    await upgrade(empty_url)
    db = database.Database(empty_url)
    try:
        async with db.engine.connect() as connection:
            differences = await connection.run_sync(_diff)
    finally:
        await db.close()
    assert differences == []


async def test_ensure_current_database_behind_raises(empty_url: str) -> None:
    await upgrade(empty_url, "0001")
    with pytest.raises(errors.ConfigurationError, match=r"at revision 0001, need "):
        await ensure_current(empty_url)


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_tables_whose_rows_are_deleted_keep_sqlite_autoincrement_after_every_migration(empty_url: str) -> None:
    await upgrade(empty_url)
    db = database.Database(empty_url)
    try:
        async with db.engine.connect() as connection:
            rows = await connection.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
            schema = {name: sql for name, sql in rows}
    finally:
        await db.close()
    for table in ("outbox", "held_dead_letters", "saga_log", "schedule_claims"):
        assert "AUTOINCREMENT" in schema[table], table


def test_head_revision_constant_is_the_migration_scripts_head() -> None:
    # A new migration must update event_store.migrate.HEAD_REVISION (start-up checks compare with it).
    assert migrate.scripts_head() == migrate.HEAD_REVISION


def test_importing_event_store_does_not_import_alembic() -> None:
    code = "import sys, event_store; print(sorted(m for m in ('alembic', 'mako') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_current_revision_of_migrated_database_is_head(db_url: str) -> None:
    assert await migrate.current_revision(db_url) == migrate.HEAD_REVISION
