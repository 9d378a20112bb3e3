"""The framework's own statements (inbox claim, outbox rows) go straight to the driver, inside the user's transaction.

They bypass SQLAlchemy's execute machinery (the cost that bounded a handler
transaction), so these tests count what SQLAlchemy itself executes with a
``before_cursor_execute`` listener, and check that the rows still commit and
roll back with the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conveyor import envelope, persistence
from sqlalchemy import event

from event_store import Database, Outbox, database, models, sql_persistence


@pytest.fixture
def statements(db: Database) -> Iterator[list[str]]:
    """The SQL statements SQLAlchemy sends on ``db`` during the test."""
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(db.engine.sync_engine, "before_cursor_execute", record)


async def _outbox_ids(db: Database) -> list[str]:
    async with db.transaction(readonly=True) as session:
        result = await session.execute(sa.select(models.outbox.c.message_id).order_by(models.outbox.c.id))
        return [str(value) for value in result.scalars()]


async def test_outbox_add_in_a_user_session_sends_no_returning_clause(db: Database, statements: list[str]) -> None:
    async with db.sessions() as session, session.begin():
        await Outbox("t").add(session, "orders.placed", {"n": 1})
    assert [s for s in statements if "RETURNING" in s.upper()] == []


async def test_outbox_add_rolled_back_with_the_user_session_leaves_no_row(db: Database) -> None:
    async with db.sessions() as session:
        await session.begin()
        await Outbox("t").add(session, "orders.placed", {"n": 1})
        await session.rollback()
    assert await _outbox_ids(db) == []


async def test_unit_of_work_on_postgres_runs_inbox_and_outbox_without_sqlalchemy_statements(
    pg_db: Database,
) -> None:
    seen: list[str] = []
    event.listen(pg_db.engine.sync_engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    units = sql_persistence(pg_db, "t").units
    unit = await units.begin("h.direct", "m-1")
    assert unit is not None
    messages = [envelope.create("orders.placed", {"n": n}, source="t") for n in range(3)]
    await unit.commit([persistence.Outgoing("orders.placed", m) for m in messages])
    assert seen == []  # the driver got them directly: no SQLAlchemy execute machinery
    assert await _outbox_ids(pg_db) == [m.scoped_id for m in messages]


async def test_unit_of_work_outbox_rows_keep_their_order_around_a_delayed_one(db: Database) -> None:
    units = sql_persistence(db, "t").units
    unit = await units.begin("h.order", "m-1")
    assert unit is not None
    messages = [envelope.create("orders.placed", {"n": n}, source="t") for n in range(4)]
    outgoing = [
        persistence.Outgoing("orders.placed", m, delay=timedelta(seconds=5) if n == 1 else None)
        for n, m in enumerate(messages)
    ]
    await unit.commit(outgoing)
    assert await _outbox_ids(db) == [m.scoped_id for m in messages]


async def test_unit_of_work_rolled_back_leaves_neither_inbox_nor_outbox_row(db: Database) -> None:
    units = sql_persistence(db, "t").units
    unit = await units.begin("h.rollback", "m-1")
    assert unit is not None
    await unit.rollback()
    again = await units.begin("h.rollback", "m-1")
    assert again is not None  # the inbox row was rolled back: the message is new again
    await again.rollback()
    assert await _outbox_ids(db) == []


def test_driver_adapter_errors_raised_outside_sqlalchemy_are_an_outage_not_the_messages_fault() -> None:
    # SQLAlchemy's asyncpg adapter raises its own DBAPI-style exceptions (not SQLAlchemyError) when the
    # connection dies while the adapter starts a transaction for a statement sent straight to the driver.
    from conveyor.errors import StoreUnavailable
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

    from event_store import database, direct

    for raised in (AsyncAdapt_asyncpg_dbapi.InterfaceError("connection is closed"),
                   AsyncAdapt_asyncpg_dbapi.Error("connection was closed in the middle of operation")):  # fmt: skip
        with pytest.raises(StoreUnavailable), database.translating(), direct._translating_driver():
            raise raised
        with pytest.raises(StoreUnavailable), database.translating():
            raise raised


async def test_a_connection_lost_under_a_direct_statement_is_not_given_back_to_the_pool(pg_db_url: str) -> None:
    # The inbox and outbox statements go straight to asyncpg, where SQLAlchemy does not see a connection
    # die: unless it is invalidated, the pool hands the dead connection out again and again.
    from conveyor.errors import StoreUnavailable
    from fault_proxy import FaultProxy
    from sqlalchemy.engine import make_url

    from event_store import Database, direct

    url = make_url(pg_db_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    db = Database(url.set(host="127.0.0.1", port=proxy.port), pool_size=1)
    try:
        async with db.transaction() as session:
            assert await direct.claim_inbox(session, "h", "before")
        proxy.cut()
        session = db.sessions()
        with pytest.raises(StoreUnavailable):
            await direct.claim_inbox(session, "h", "during")
        await database.discard(session)
        proxy.restore()
        for attempt in range(3):  # the pool's one connection died: the next checkout must open a new one
            session = db.sessions()
            try:
                assert await direct.claim_inbox(session, "h", f"after-{attempt}")
                await session.commit()
                break
            except StoreUnavailable:
                await database.discard(session)
        else:
            raise AssertionError("the dead connection kept coming back from the pool")
        assert attempt == 0, f"{attempt} attempts failed on the dead connection"
    finally:
        proxy.restore()
        await db.close()
        await proxy.close()
