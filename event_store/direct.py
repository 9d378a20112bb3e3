"""Conveyor's own statements on a session's connection, without the ORM execute machinery.

A handler's unit of work runs three framework statements around the user's
own: the inbox claim, the outbox rows and the commit. Through
``AsyncSession.execute`` each costs a statement construction, a cache-key
computation, the ORM execute path and a greenlet round trip: on a two-core
machine that Python work, not the database, bounded a one-row transaction.
Here the SQL text is fixed per dialect and handed to the driver:

* **PostgreSQL (asyncpg)**: straight to the asyncpg connection under the
  session (the driver's prepared-statement cache applies). The session's
  transaction is started first through SQLAlchemy's own adapter, so the
  statements are inside it and the session's commit or rollback ends them
  (see :func:`_started_driver`). Several outbox rows are one pipelined
  ``executemany``.
* **SQLite (aiosqlite)**: ``exec_driver_sql`` on the session's connection
  (which also begins the session's ``BEGIN IMMEDIATE`` transaction).

No statement has a ``RETURNING`` clause: nothing reads the generated ids.
Driver errors are translated like SQLAlchemy's (:func:`database.translate`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from conveyor import envelope, errors
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, models

_INBOX = {
    "postgresql": "INSERT INTO inbox (handler, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    "sqlite": "INSERT INTO inbox (handler, message_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
}
_OUTBOX = {
    "postgresql": "INSERT INTO outbox (message_id, topic, partition_key, headers, body) VALUES ($1, $2, $3, $4, $5)",
    "sqlite": "INSERT INTO outbox (message_id, topic, partition_key, headers, body) VALUES (?, ?, ?, ?, ?)",
}
_FAST_DRIVERS = {("postgresql", "asyncpg"), ("sqlite", "aiosqlite")}
"""Drivers the SQL text above is written for (paramstyle); others get cached Core statements."""

OutboxParams = tuple[str, str, str | None, str, bytes]
"""``(message_id, topic, partition_key, headers as JSON text, body)``."""


def outbox_params(topic: str, event: envelope.Envelope) -> OutboxParams:
    """The outbox insert's parameters for an envelope (binary mode, HTTP-binding headers as JSON text)."""
    wire = envelope.to_binary(event, envelope.HTTP_PREFIX)
    return event.scoped_id, topic, event.partitionkey, orjson.dumps(wire.headers).decode(), wire.body


@contextlib.contextmanager
def _translating_driver() -> Iterator[None]:
    """Translate asyncpg's own exceptions (raised outside SQLAlchemy) like SQLAlchemy's."""
    try:
        yield
    except errors.ConveyorError:
        raise
    except Exception as error:
        if not database.is_driver_error(error):
            raise
        raise database.translate(error) from error


@contextlib.asynccontextmanager
async def _invalidating_on_outage(session: AsyncSession) -> AsyncIterator[None]:
    """Invalidate the session's connection when a statement sent straight to the driver loses it.

    SQLAlchemy never sees that statement fail, so it would give the dead
    connection back to the pool, which would hand it out again and again.
    """
    try:
        yield
    except Exception as error:
        if database.is_driver_error(error) and isinstance(database.translate(error), errors.StoreUnavailable):
            with contextlib.suppress(Exception):
                await session.invalidate()
        raise


_DRIVER = "conveyor_driver"
"""Session ``info`` key: ``(session transaction, asyncpg connection)`` of the last :func:`_started_driver`."""


async def _started_driver(session: AsyncSession) -> Any | None:
    """The asyncpg connection under ``session``, its transaction begun; None if the adapter is not asyncpg's.

    SQLAlchemy's asyncpg adapter begins a transaction lazily, at the first
    statement it runs itself. A statement sent to the asyncpg connection
    before that would run outside the session's transaction (autocommit), so
    the adapter's transaction is started here first. Its attributes are
    checked, not assumed: with an adapter that lacks them the caller falls back
    to ``exec_driver_sql`` (slower, equally correct). The connection is
    remembered for the session's current transaction only (a commit returns it
    to the pool).
    """
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_DRIVER)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1]
    connection = await session.connection()
    sync = connection.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        fairy = sync.connection  # checked out by session.connection(): an attribute, no I/O
    else:
        fairy = await connection.get_raw_connection()
    adapter = fairy.dbapi_connection
    if adapter is None or not hasattr(adapter, "_start_transaction") or not hasattr(adapter, "_transaction"):
        return None
    if adapter._transaction is None:
        if getattr(adapter, "isolation_level", None) == "autocommit":
            return None
        async with adapter._execute_mutex:
            if adapter._transaction is None:
                await adapter._start_transaction()
    driver = fairy.driver_connection
    session.info[_DRIVER] = (session.sync_session.get_transaction(), driver)
    return driver


def _fast(session: AsyncSession) -> str | None:
    """The dialect whose SQL text above fits the session's driver, or None (then Core statements are used)."""
    dialect = session.get_bind().dialect
    if (dialect.name, dialect.driver) in _FAST_DRIVERS:
        return dialect.name
    return None


async def claim_inbox(session: AsyncSession, handler: str, message_id: str) -> bool:
    """Insert the inbox row in the session's transaction; True if it is new (see :meth:`Inbox.claim`).

    Raises:
        StoreError: the database failed.
    """
    dialect = _fast(session)
    with database.translating(), _translating_driver():
        if dialect == "postgresql":
            async with _invalidating_on_outage(session):
                driver = await _started_driver(session)
                status: str | None = (
                    None if driver is None else await driver.execute(_INBOX[dialect], handler, message_id)
                )
            if status is not None:
                return status.endswith(" 1")
        if dialect is not None:
            connection = await session.connection()
            result: Any = await connection.exec_driver_sql(_INBOX[dialect], (handler, message_id))
        else:
            result = await session.execute(_inbox_statement(session), {"handler": handler, "message_id": message_id})
        return int(result.rowcount or 0) == 1


async def insert_outbox(session: AsyncSession, rows: Sequence[OutboxParams]) -> None:
    """Insert outbox rows (from :func:`outbox_params`), due at once, in the session's transaction.

    Raises:
        StoreError: the database refused a row (a duplicate message id, say) or failed.
    """
    if not rows:
        return
    dialect = _fast(session)
    with database.translating(), _translating_driver():
        if dialect == "postgresql":
            async with _invalidating_on_outage(session):
                driver = await _started_driver(session)
                if driver is not None:
                    if len(rows) == 1:
                        await driver.execute(_OUTBOX[dialect], *rows[0])
                    else:
                        await driver.executemany(_OUTBOX[dialect], rows)
            if driver is not None:
                session.info[database.OUTBOX_ADDED] = True
                return
        if dialect is not None:
            connection = await session.connection()
            await connection.exec_driver_sql(_OUTBOX[dialect], list(rows) if len(rows) > 1 else rows[0])
        else:
            columns = ("message_id", "topic", "partition_key", "headers", "body")
            params = [dict(zip(columns, (*row[:3], orjson.loads(row[3]), row[4]), strict=True)) for row in rows]
            await session.execute(_OUTBOX_CORE, params)
    session.info[database.OUTBOX_ADDED] = True


async def claim_rows(
    session: AsyncSession, sql: str, params: tuple[int, int, int, list[int], list[str]]
) -> list[Any] | None:
    """The relay's claim (``sql`` and ``params`` as :func:`outbox_sql.claim_driver_sql` says) run by asyncpg
    in the session's transaction (the dialect's JSON codec decodes ``headers``); None when the session's
    driver is not asyncpg (run the Core statement then).

    Raises:
        StoreError: the database failed.
    """
    if _fast(session) != "postgresql":
        return None
    with database.translating(), _translating_driver():
        async with _invalidating_on_outage(session):
            driver = await _started_driver(session)
            if driver is None:
                return None
            records: list[Any] = await driver.fetch(sql, *params)
    return records


_OUTBOX_CORE = sa.insert(models.outbox).inline()
_INBOX_CORE: dict[str, Any] = {}


def _inbox_statement(session: AsyncSession) -> Any:
    name = session.get_bind().dialect.name
    statement = _INBOX_CORE.get(name)
    if statement is None:
        insert = database.insert_for(session)
        statement = insert(models.inbox).on_conflict_do_nothing(index_elements=["handler", "message_id"])
        _INBOX_CORE[name] = statement
    return statement
