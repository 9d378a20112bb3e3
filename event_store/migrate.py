"""Running and checking Conveyor's migrations from code (``conveyor db upgrade``).

Alembic keeps the applied revision in ``conveyor_alembic_version`` (not the
default ``alembic_version``), so a service's own Alembic history can live in
the same database.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conveyor import errors

from event_store import database

_HERE = Path(__file__).parent / "migrations"
VERSION_TABLE = "conveyor_alembic_version"


def alembic_config() -> Config:
    """An Alembic config pointing at Conveyor's migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(_HERE / "versions"))
    return config


def head_revision() -> str:
    """The newest revision the migration scripts define."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade_connection(connection: sa.Connection, revision: str = "head") -> None:
    """Migrate through an open synchronous connection (committed by the caller)."""
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def current_revision_of(connection: sa.Connection) -> str | None:
    """The revision a database is at, or None if it was never migrated."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def upgrade(url: str, revision: str = "head") -> None:
    """Create or upgrade Conveyor's tables in the database at ``url``; idempotent.

    Raises:
        ConfigurationError: unsupported URL.
        StoreError: the database failed (:class:`StoreUnavailable` if unreachable).
    """
    db = database.Database(url, pool_size=1)
    try:
        with database.translating():
            async with db.engine.connect() as connection:
                await connection.run_sync(upgrade_connection, revision)
                await connection.commit()
    finally:
        await db.close()


async def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None: never migrated).

    Raises:
        StoreError: the database failed.
    """
    db = database.Database(url, pool_size=1)
    try:
        with database.translating():
            async with db.engine.connect() as connection:
                return await connection.run_sync(current_revision_of)
    finally:
        await db.close()


def check_revision(current: str | None, display_url: str) -> None:
    """Raise unless ``current`` is the head revision.

    Raises:
        ConfigurationError: the database is behind or empty.
    """
    head = head_revision()
    if current != head:
        raise errors.ConfigurationError(
            f"database at {display_url} is not migrated (at revision {current or 'none'}, "
            f"need {head}): run `conveyor db upgrade`"
        )


async def ensure_current(url: str) -> None:
    """Check at start-up that the database has every migration applied.

    Raises:
        ConfigurationError: the database is behind or empty, with the command to fix it.
        StoreError: the database failed (:class:`StoreUnavailable` if unreachable).
    """
    display = database.normalize_url(url).render_as_string(hide_password=True)
    check_revision(await current_revision(url), display)
