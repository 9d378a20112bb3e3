"""Alembic environment for Conveyor's tables.

Programmatic runs (:mod:`event_store.migrate`) hand over an open synchronous
connection in ``config.attributes["connection"]``; the alembic CLI gets the URL
from ``CONVEYOR_DATABASE_URL`` (or ``sqlalchemy.url``) and runs on an async
engine.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from event_store import database, models

VERSION_TABLE = "conveyor_alembic_version"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=models.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(database.normalize_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("CONVEYOR_DATABASE_URL") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set CONVEYOR_DATABASE_URL to the database to migrate")
    asyncio.run(_run_async(url))


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run against a database")
_main()
