"""A failure's fate on a real database: a slow commit is not an outage, a statement error is the handler's.

Each handler runs on the memory transport against SQLite and PostgreSQL with a
ledger of its runs (the attempt numbers it saw), so a message held for ever
(runs ``[1, 1, 1, ...]``) or a key blocked behind it shows.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from conveyor import Context, envelope, on, ports, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime import app
from conveyor.runtime.handling import HandlerRunner
from conveyor.runtime.worker import Worker, dead_letter_topic
from conveyor.testing import Collector, unique, wait_for
from conveyor.transports.memory import MemoryTransport

from event_store import Database

FAST = RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.1, jitter=0)


async def _run(database: Database, handler: object, items: list[tuple[dict, str | None]]) -> tuple[Worker, Collector]:
    transport = MemoryTransport(f"memory://{unique('fate')}")
    await transport.connect()
    handlers = registry.Registry.of(handler).handlers
    dead = Collector()
    await transport.subscribe(ports.Subscription(name=unique("dlq"), topic=dead_letter_topic(handlers[0].topic)), dead)
    stores = app.stores_for(database, "t")
    worker = Worker(handlers, transport, source="t", transactions=stores.units)
    await worker.start()
    for data, key in items:
        event = envelope.create(handlers[0].topic, data, source="t", key=key)
        await transport.publish(handlers[0].topic, envelope.to_binary(event, "ce-"))
    return worker, dead


async def test_a_commit_after_a_handler_used_most_of_its_timeout_is_not_an_outage(db: Database) -> None:
    topic = unique("slow")
    runs: list[int] = []
    rows = 3000

    @on(topic, name=unique("slow"), timeout=1.0, max_attempts=3, backoff=FAST)
    async def busy(payload: dict, ctx: Context) -> None:
        runs.append(ctx.message.attempt)
        async with ctx.transaction() as tx:
            await asyncio.sleep(0.9)  # most of the handler's timeout
            for n in range(rows):  # a commit that takes longer than what is left of it
                tx.publish(unique("out"), {"n": n})

    worker, dead = await _run(db, busy, [({"n": 1}, None)])
    try:
        await wait_for(lambda: bool(runs), 10, "the first run")
        await asyncio.sleep(3)  # a held or retried attempt would run again meanwhile
    finally:
        await worker.stop(5)
    async with db.transaction(readonly=True) as session:
        written = (await session.execute(sa.text("SELECT count(*) FROM outbox"))).scalar_one()
    assert (runs, written, len(dead.received)) == ([1], rows, 0)


async def test_a_statement_the_database_refuses_spends_attempts_and_frees_its_key(db: Database) -> None:
    topic = unique("bad")
    runs: list[tuple[int, int]] = []
    refused = (
        "SELECT no_such_column FROM inbox"  # SQLite: an OperationalError, yet the statement's fault
        if db.is_sqlite
        else "SELECT pg_sleep(5)"  # PostgreSQL: cancelled by the statement_timeout below (57014)
    )

    @on(topic, name=unique("bad"), max_attempts=3, backoff=FAST, concurrency=2)
    async def broken(payload: dict, ctx: Context) -> None:
        runs.append((payload["n"], ctx.message.attempt))
        async with ctx.transaction() as tx:
            if payload["n"] == 1:
                if db.is_postgres:
                    await tx.session.execute(sa.text("SET LOCAL statement_timeout = '50ms'"))
                await tx.session.execute(sa.text(refused))

    worker, dead = await _run(db, broken, [({"n": 1}, "k"), ({"n": 2}, "k")])
    try:
        await wait_for(
            lambda: len(dead.received) == 1 and (2, 1) in runs, 20, "a dead letter, then the next of its key"
        )
    finally:
        await worker.stop(5)
    letter = dead.received[0].message.headers
    assert [attempt for n, attempt in runs if n == 1] == [1, 2, 3]
    assert (letter["conveyor-dlq-error-type"], letter["conveyor-dlq-attempts"]) == ("StatementError", "3")


class _Copy:
    """A redelivered copy of ``message`` as a broker hands it over after earlier workers died with it."""

    def __init__(self, topic: str, message: envelope.WireMessage, attempt: int) -> None:
        self.topic, self.message, self.attempt = topic, message, attempt
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, delay: float) -> None:
        self.settled.append("nack")


async def _one_applied_one_not(db: Database, func: object, attempt: int) -> tuple[list[_Copy], Collector]:
    """Deliver, at ``attempt``, a copy of a message the inbox shows applied and one of a fresh message."""
    (handler,) = registry.Registry.of(func).handlers
    transport = MemoryTransport(f"memory://{unique('fate')}")
    await transport.connect()
    dead = Collector()
    await transport.subscribe(ports.Subscription(name=unique("dlq"), topic=dead_letter_topic(handler.topic)), dead)
    stores = app.stores_for(db, "t")
    runner = HandlerRunner(handler, transport, source="t", max_message_bytes=1 << 20, transactions=stores.units)
    applied, fresh = (envelope.create(handler.topic, {"n": n}, source="t") for n in (1, 2))
    unit = await stores.units.begin(handler.name, applied.scoped_id)
    assert unit is not None
    await unit.commit([])
    copies = [_Copy(handler.topic, envelope.to_binary(event, "ce-"), attempt) for event in (applied, fresh)]
    try:
        for copy in copies:
            await runner.process(copy)
        await wait_for(lambda: len(dead.received) >= 1, 5, "the never-applied copy's dead letter")
    finally:
        await transport.close()
    return copies, dead


async def test_a_copy_delivered_past_max_attempts_after_an_earlier_attempt_committed_is_a_duplicate(
    db: Database,
) -> None:
    # An attempt committed, then its worker died before the ack, again and again: the copy the broker
    # delivers past max_attempts was applied once and must be acked as a duplicate, not dead-lettered.
    topic = unique("applied")

    @on(topic, name=unique("applied"), max_attempts=3, backoff=FAST, transactional=True)
    async def apply(payload: dict, ctx: Context) -> None: ...

    copies, dead = await _one_applied_one_not(db, apply, attempt=4)
    assert [copy.settled for copy in copies] == [["ack"], ["ack"]]
    assert [r.message.headers.get("conveyor-dlq-error-type") for r in dead.received] == ["TooManyDeliveries"]
    assert dead.received[0].message.body == copies[1].message.body


async def test_a_copy_that_fails_its_last_attempt_after_another_copy_applied_the_message_is_a_duplicate(
    db: Database,
) -> None:
    # Two copies at once: one applied the message; the other fails before it reaches the inbox, on its
    # last attempt. Dead-lettering it would leave the dead-letter topic holding an applied message.
    topic = unique("twice")

    @on(topic, name=unique("twice"), max_attempts=3, backoff=FAST)
    async def flaky(payload: dict, ctx: Context) -> None:
        raise ValueError("failed before its transaction")

    copies, dead = await _one_applied_one_not(db, flaky, attempt=3)
    assert [copy.settled for copy in copies] == [["ack"], ["ack"]]
    assert [r.message.headers.get("conveyor-dlq-error-type") for r in dead.received] == ["ValueError"]
