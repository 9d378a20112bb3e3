"""A frozen database (a partition: packets dropped, connections left open) loses nothing that was acknowledged.

PostgreSQL is reached through a TCP proxy that stops forwarding for many
times the handler timeout without closing anything, then heals. Attempts time
out mid-statement meanwhile; a connection so cancelled must never be reused in
an unknown state (asyncpg would then run the next units of work as savepoints
inside a transaction nobody commits), and no message may be acked before its
commit is proven.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from conveyor import Context, envelope, errors, on, ports, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime import app
from conveyor.runtime.worker import Worker, dead_letter_topic
from conveyor.testing import Collector, unique
from conveyor.transports.memory import MemoryTransport
from fault_proxy import FaultProxy
from sqlalchemy.engine import make_url

from event_store import Database, database

MESSAGES = 120
FREEZE_SECONDS = 4.0
BUDGET = RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.1, jitter=0)


@pytest.fixture
async def frozen(pg_db_url: str) -> AsyncIterator[tuple[Database, FaultProxy, str]]:
    url = make_url(pg_db_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    database = Database(url.set(host="127.0.0.1", port=proxy.port))
    async with database.transaction() as session:
        await session.execute(sa.text("CREATE TABLE effects (message_id VARCHAR(64) PRIMARY KEY)"))
    yield database, proxy, pg_db_url
    proxy.restore()
    await database.close()
    await proxy.close()


async def _direct(url: str, sql: str) -> int:
    """A count read past the proxy, on a connection of its own."""
    database = Database(url)
    try:
        async with database.transaction(readonly=True) as session:
            return int((await session.execute(sa.text(sql))).scalar_one())
    finally:
        await database.close()


async def test_database_frozen_longer_than_the_handler_timeout_loses_no_acked_message(
    frozen: tuple[Database, FaultProxy, str],
) -> None:
    database, proxy, direct_url = frozen
    topic = unique("freeze")
    name = unique("freeze")

    @on(topic, name=name, backoff=BUDGET, max_attempts=3, concurrency=8, timeout=1.0)
    async def record(payload: dict, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": ctx.message.id})

    transport = MemoryTransport(f"memory://{unique('freeze')}")
    await transport.connect()
    dead = Collector()
    await transport.subscribe(ports.Subscription(name=unique("dlq"), topic=dead_letter_topic(topic)), dead)
    stores = app.stores_for(database, "t")
    worker = Worker(registry.Registry.of(record).handlers, transport, source="t", transactions=stores.units)
    await worker.start()
    subscription = ports.Subscription(name=name, topic=topic)
    try:
        for n in range(MESSAGES):
            await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), "ce-"))
            if n == MESSAGES // 4:
                proxy.freeze()
        await asyncio.sleep(FREEZE_SECONDS)  # attempts time out mid-statement, again and again
        proxy.restore()

        async def settled() -> bool:
            backlog = await transport.backlog(subscription)
            return backlog.pending == 0 and backlog.in_flight == 0

        deadline = asyncio.get_running_loop().time() + 90
        while not await settled():
            assert asyncio.get_running_loop().time() < deadline, "messages still unsettled 90 s after the freeze"
            await asyncio.sleep(0.1)
        assert await worker.stop(5)
    finally:
        proxy.restore()
        await transport.close()
    await database.close()  # every pooled connection: a transaction left open on one is rolled back here
    # Every message was acked (nothing is pending or in flight), so every one must have its effect.
    committed = await _direct(direct_url, "SELECT count(*) FROM effects")
    assert (committed, len(dead.received)) == (MESSAGES, 0)


async def _raw(session: sa.ext.asyncio.AsyncSession) -> object:
    connection = await session.connection()
    return (await connection.get_raw_connection()).driver_connection


async def test_pool_never_hands_out_a_connection_left_inside_a_transaction(pg_db: Database) -> None:
    session = pg_db.sessions()
    driver = await _raw(session)
    await driver.transaction().start()  # type: ignore[attr-defined]  # what a BEGIN cancelled mid-flight leaves
    await session.close()  # SQLAlchemy's adapter knows of no transaction: the connection goes back as it is
    async with pg_db.transaction() as again:
        assert not database.in_transaction(await _raw(again)) or (await _raw(again)) is not driver
        in_block = (
            await again.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in%'"
                    " AND pid <> pg_backend_pid() AND datname = current_database()"
                )
            )
        ).scalar_one()
    assert in_block == 0


async def test_commit_inside_a_transaction_it_did_not_begin_is_not_proven(pg_db: Database) -> None:
    session = pg_db.sessions()
    try:
        driver = await _raw(session)  # checked out clean; then left inside a block SQLAlchemy does not know
        await driver.transaction().start()  # type: ignore[attr-defined]
        await session.execute(sa.text("SELECT 1"))  # SQLAlchemy's transaction is now a savepoint of that block
        with pytest.raises(errors.StoreUnavailable, match="could not be proven"):
            await database.commit(session)
    finally:
        await database.discard(session, drop=True)


@pytest.mark.parametrize(
    ("error", "drop"),
    [
        (None, False),
        (asyncio.CancelledError(), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (errors.StoreUnavailable("gone"), True),
        (errors.StatementError("no such column"), False),
        (ValueError("the handler's own"), False),
    ],
)
def test_doubtful_connections_are_those_of_cancelled_statements_and_outages(
    error: BaseException | None, drop: bool
) -> None:
    assert database.doubtful(error) is drop


def test_asyncpg_still_tracks_its_transaction_block_where_the_pool_guard_looks() -> None:
    import asyncpg

    # The guard reads asyncpg's private ``_top_xact``: an upgrade that renames it must fail here, not lose data.
    assert "_top_xact" in asyncpg.connection.Connection.__slots__ or hasattr(asyncpg.connection.Connection, "_top_xact")
