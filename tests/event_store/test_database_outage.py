"""A database outage is not the message's fault: it spends no attempts and fills no dead letters.

PostgreSQL is reached through a TCP proxy that the test cuts for longer than
the handler's whole retry budget; every message must still be handled exactly
once when the database comes back, and none dead-lettered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from conveyor import Context, envelope, on, ports, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime import app
from conveyor.runtime.worker import Worker, dead_letter_topic
from conveyor.testing import Collector, unique, wait_for
from conveyor.transports.memory import MemoryTransport
from fault_proxy import FaultProxy
from sqlalchemy.engine import make_url

from event_store import Database

MESSAGES = 40
BUDGET = RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.1, jitter=0)  # spent in well under a second


@pytest.fixture
async def proxied(pg_db_url: str) -> AsyncIterator[tuple[Database, FaultProxy]]:
    url = make_url(pg_db_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    database = Database(url.set(host="127.0.0.1", port=proxy.port))
    async with database.transaction() as session:
        await session.execute(sa.text("CREATE TABLE effects (message_id VARCHAR(64) PRIMARY KEY)"))
    yield database, proxy
    proxy.restore()
    await database.close()
    await proxy.close()


async def effects(database: Database) -> int:
    async with database.transaction(readonly=True) as session:
        return int((await session.execute(sa.text("SELECT count(*) FROM effects"))).scalar_one())


async def test_database_outage_longer_than_the_retry_budget_dead_letters_nothing(
    proxied: tuple[Database, FaultProxy],
) -> None:
    database, proxy = proxied
    topic = unique("outage")
    handled: list[int] = []

    @on(topic, name=unique("outage"), backoff=BUDGET, max_attempts=3, concurrency=4)
    async def record(payload: dict, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": ctx.message.id})
        handled.append(payload["n"])

    transport = MemoryTransport(f"memory://{unique('outage')}")
    await transport.connect()
    dead = Collector()
    await transport.subscribe(ports.Subscription(name=unique("dlq"), topic=dead_letter_topic(topic)), dead)
    stores = app.stores_for(database, "t")
    worker = Worker(registry.Registry.of(record).handlers, transport, source="t", transactions=stores.units)
    await worker.start()
    try:
        for n in range(MESSAGES):
            await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), "ce-"))
            if n == MESSAGES // 4:
                await wait_for(lambda: len(handled) > 0, 10, "the first effects")
                proxy.cut()
        await asyncio.sleep(3)  # the database is gone for many times the retry budget
        proxy.restore()
        await wait_for(lambda: len(set(handled)) == MESSAGES, 60, "every message after the outage")
        assert await worker.stop(5)
    finally:
        proxy.restore()
        await transport.close()
    assert (await effects(database), len(dead.received)) == (MESSAGES, 0)
