"""Exactly-once effects: a handler's transaction (inbox first) absorbs redeliveries, even concurrent ones."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from conveyor import Context, envelope, on, registry
from conveyor.runtime import app
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport

from event_store import Database


async def ledger_rows(db: Database) -> list[str]:
    async with db.transaction(readonly=True) as session:
        return [row[0] for row in await session.execute(sa.text("SELECT message_id FROM effects"))]


async def test_a_message_delivered_five_times_two_at_once_has_one_effect(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE effects (message_id VARCHAR(64) NOT NULL)"))
    topic, name = unique("once"), unique("once")
    attempts: list[str] = []

    @on(topic, name=name)
    async def apply(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.id)
        async with ctx.transaction() as tx:
            await asyncio.sleep(0.05)  # widen the window for the concurrent copy
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": ctx.message.id})

    transports = [MemoryTransport(f"memory://{unique('once')}") for _ in range(2)]
    workers = []
    for transport in transports:
        await transport.connect()
        worker = Worker(registry.Registry.of(apply).handlers, transport, source="t",
                        transactions=app.stores_for(db, "t").units)  # fmt: skip
        await worker.start()
        workers.append(worker)
    event = envelope.create(topic, {"n": 1}, source="t")
    wire = envelope.to_binary(event, transports[0].binary_prefix)
    try:
        for expected in (1, 2, 3):  # redelivered three times, one after another
            await transports[0].publish(topic, wire)
            await wait_for(lambda e=expected: len(attempts) == e, 10, "the delivery")
        await asyncio.gather(*(t.publish(topic, wire) for t in transports))  # and to two workers at once
        await wait_for(lambda: len(attempts) == 5, 10, "the concurrent deliveries")
        for worker in workers:
            assert await worker.stop(5)
    finally:
        for transport in transports:
            await transport.close()
    assert await ledger_rows(db) == [event.id]


async def test_a_failed_transaction_leaves_no_inbox_row_so_the_retry_applies_the_effect(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE effects (message_id VARCHAR(64) NOT NULL)"))
    topic = unique("once")
    attempts: list[int] = []

    @on(topic, name=unique("once"), backoff=registry.retry.RetryPolicy(initial_delay=0.05, jitter=0))
    async def flaky(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.attempt)
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id)"), {"id": ctx.message.id})
            tx.publish(unique("out"), {"n": 1})
            if ctx.message.attempt == 1:
                raise RuntimeError("fails after writing: everything rolls back")

    transport = MemoryTransport(f"memory://{unique('once')}")
    await transport.connect()
    worker = Worker(registry.Registry.of(flaky).handlers, transport, source="t",
                    transactions=app.stores_for(db, "t").units)  # fmt: skip
    await worker.start()
    event = envelope.create(topic, {"n": 1}, source="t")
    await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))
    await wait_for(lambda: attempts == [1, 2], 10, "the retry")
    await worker.stop(5)
    await transport.close()
    async with db.transaction(readonly=True) as session:
        outbox = (await session.execute(sa.text("SELECT count(*) FROM outbox"))).scalar_one()
    assert (await ledger_rows(db), outbox) == ([event.id], 1)
