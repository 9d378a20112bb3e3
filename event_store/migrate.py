"""Running and checking Conveyor's migrations from code (``conveyor db upgrade|current|history``).

Alembic keeps the applied revision in ``conveyor_alembic_version`` (not the
default ``alembic_version``), so a service's own Alembic history can live in
the same database.

Alembic (with Mako and Pygments, about 5 MB of resident memory) is imported
only by the functions that migrate. Checking a database at start-up, which
every worker does, reads the version table with a plain select and compares it
with :data:`HEAD_REVISION`; a test keeps that constant equal to the scripts'
head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from conveyor import errors

from event_store import database

if TYPE_CHECKING:
    from alembic.config import Config

_HERE = Path(__file__).parent / "migrations"
VERSION_TABLE = "conveyor_alembic_version"
HEAD_REVISION = "0009"
"""The newest revision of ``migrations/versions``; update it with every new migration."""


@dataclass(frozen=True, slots=True)
class Upgraded:
    """What :func:`upgrade` did.

    Attributes:
        before: the revision the database was at (None: never migrated).
        after: the revision it is at now.
        created: the tables that did not exist before, sorted.
    """

    before: str | None
    after: str | None
    created: tuple[str, ...]

    def describe(self, display_url: str) -> str:
        """One line for an operator: what was created or migrated, or that nothing was to do."""
        if self.before == self.after:
            return f"database {display_url} was already at revision {self.after} (the newest): nothing to do"
        tables = f"{len(self.created)} table(s): {', '.join(self.created)}" if self.created else "no new tables"
        if self.before is None:
            return f"database {display_url}: created {tables}; now at revision {self.after}"
        return f"database {display_url}: migrated from revision {self.before} to {self.after}; created {tables}"


@dataclass(frozen=True, slots=True)
class Revision:
    """One migration script, as ``conveyor db history`` lists it.

    Attributes:
        revision: its id, e.g. ``"0007"``.
        description: the first line of its docstring.
        applied: whether the database holds it (it is at this revision or a later one).
        current: whether the database is at exactly this revision.
    """

    revision: str
    description: str
    applied: bool
    current: bool


def alembic_config() -> Config:
    """An Alembic config pointing at Conveyor's migration scripts."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(_HERE / "versions"))
    return config


def head_revision() -> str:
    """The newest revision the migration scripts define (:data:`HEAD_REVISION`)."""
    return HEAD_REVISION


def scripts_head() -> str | None:
    """The head revision as Alembic reads it from the scripts (imports Alembic; for tests and tools)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_connection(connection: sa.Connection, revision: str = "head") -> None:
    """Migrate through an open synchronous connection (committed by the caller)."""
    from alembic import command

    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def current_revision_of(connection: sa.Connection) -> str | None:
    """The revision a database is at, or None if it was never migrated (no version table, or no row)."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    rows = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise errors.ConfigurationError(
            f"table {VERSION_TABLE} holds {len(rows)} revisions ({', '.join(sorted(rows))}); Conveyor's "
            "migrations have one head: repair the table, then run `conveyor db upgrade`"
        )
    return rows[0] if rows else None


def _upgrade_reporting(connection: sa.Connection, revision: str) -> Upgraded:
    before = current_revision_of(connection)
    tables = set(sa.inspect(connection).get_table_names())
    upgrade_connection(connection, revision)
    created = set(sa.inspect(connection).get_table_names()) - tables
    return Upgraded(before, current_revision_of(connection), tuple(sorted(created)))


async def upgrade(url: str, revision: str = "head") -> Upgraded:
    """Create or upgrade Conveyor's tables in the database at ``url``; idempotent.

    Returns:
        The revisions before and after, and the tables created.

    Raises:
        ConfigurationError: unsupported URL.
        StoreError: the database failed (:class:`StoreUnavailable` if unreachable).
    """
    db = database.Database(url, pool_size=1)
    try:
        with database.translating():
            async with db.engine.connect() as connection:
                done = await connection.run_sync(_upgrade_reporting, revision)
                await connection.commit()
                return done
    finally:
        await db.close()


def scripts() -> list[tuple[str, str]]:
    """Every migration script, oldest first: ``(revision, first line of its docstring)`` (imports Alembic)."""
    from alembic.script import ScriptDirectory

    found = ScriptDirectory.from_config(alembic_config()).walk_revisions()  # newest first
    return [(script.revision, (script.doc or "").strip().splitlines()[0] if script.doc else "") for script in found][
        ::-1
    ]


async def history(url: str) -> list[Revision]:
    """Every migration script, oldest first, marked as applied or not in the database at ``url``.

    Raises:
        ConfigurationError: the version table holds several revisions, or one newer than the scripts.
        StoreError: the database failed.
    """
    current = await current_revision(url)
    listed = scripts()
    order = [revision for revision, _ in listed]
    if current is not None and current not in order:
        raise errors.ConfigurationError(
            f"the database is at revision {current}, which this version of Conveyor does not have (its newest "
            f"is {HEAD_REVISION}): it was migrated by a newer version"
        )
    reached = order.index(current) if current in order else -1
    return [
        Revision(revision, description, applied=i <= reached, current=revision == current)
        for i, (revision, description) in enumerate(listed)
    ]


async def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None: never migrated).

    Raises:
        ConfigurationError: the version table holds several revisions.
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
    if current != HEAD_REVISION:
        raise errors.ConfigurationError(
            f"database at {display_url} is not migrated (at revision {current or 'none'}, "
            f"need {HEAD_REVISION}): run `conveyor db upgrade`"
        )


async def ensure_current(url: str) -> None:
    """Check at start-up that the database has every migration applied.

    Raises:
        ConfigurationError: the database is behind or empty, with the command to fix it.
        StoreError: the database failed (:class:`StoreUnavailable` if unreachable).
    """
    display = database.normalize_url(url).render_as_string(hide_password=True)
    check_revision(await current_revision(url), display)
