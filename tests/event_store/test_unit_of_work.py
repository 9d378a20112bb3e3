"""A handler attempt is one unit of work: a retry completes what failed without re-applying what committed.

The rule under test: once a handler opens ``ctx.transaction()``, the attempt's
database transaction stays open until the handler returns; every message the
attempt publishes goes to the outbox in it and the inbox row commits with it.
A failure anywhere in the attempt rolls all of it back, so the retry runs the
whole handler again. Each scenario writes effects to a ledger table and checks
the ledger and the messages that reached the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import prometheus_client
import pytest
import sqlalchemy as sa
from conveyor import ConfigurationError, Context, envelope, errors, on, ports, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime import app
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.runtime.worker import Worker
from conveyor.testing import Collector, unique, wait_for
from relay_helpers import PublishEach, unsent, wait_until

from event_store import Database, SqlOutboxStore

FAST = RetryPolicy(initial_delay=0.05, jitter=0)


class FlakyTransport(PublishEach):
    """A memory transport that refuses the first ``failures`` publishes to ``topic``."""

    def __init__(self, url: str, topic: str, failures: int) -> None:
        super().__init__(url)
        self.flaky_topic = topic
        self.failures = failures

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        if topic == self.flaky_topic and self.failures > 0:
            self.failures -= 1
            raise errors.TransportError(f"refused a message to {topic} (test)")
        await super().publish(topic, message)


@dataclass
class Setup:
    db: Database
    transport: FlakyTransport
    audit: Collector
    topic: str
    audit_topic: str


@pytest.fixture
async def setup(db: Database) -> AsyncIterator[Setup]:
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE effects (message_id VARCHAR(64) NOT NULL, what VARCHAR(32))"))
    audit_topic = unique("audit")
    transport = FlakyTransport(f"memory://{unique('uow')}", audit_topic, failures=1)
    await transport.connect()
    audit = Collector()
    await transport.subscribe(ports.Subscription(name=unique("audit-sub"), topic=audit_topic), audit)
    yield Setup(db, transport, audit, unique("uow"), audit_topic)
    await transport.close()


@contextlib.asynccontextmanager
async def running(setup: Setup, *handlers: object) -> AsyncIterator[None]:
    """A worker for ``handlers`` and an outbox relay, both on the setup's transport and database."""
    persistence = app.stores_for(setup.db, "t")
    worker = Worker(
        registry.Registry.of(*handlers).handlers, setup.transport, source="t", transactions=persistence.units
    )
    await worker.start()
    stop = asyncio.Event()
    relay = Relay(SqlOutboxStore(setup.db, listen=False), setup.transport, options=RelayOptions(poll_interval=0.05))
    relay_task = asyncio.create_task(relay.run(stop))
    try:
        yield
    finally:
        stop.set()
        await relay_task
        await worker.stop(5)
        await relay.store.close()


async def ledger(db: Database) -> list[tuple[str, str]]:
    async with db.transaction(readonly=True) as session:
        rows = await session.execute(sa.text("SELECT message_id, what FROM effects ORDER BY what"))
        return [(row[0], row[1]) for row in rows]


async def send(setup: Setup) -> str:
    event = envelope.create(setup.topic, {"n": 1}, source="t")
    await setup.transport.publish(setup.topic, envelope.to_binary(event, setup.transport.binary_prefix))
    return event.id


def finished(handler: str) -> float:
    """Deliveries the handler settled for good (acknowledged: never redelivered), from the worker's metrics."""
    return sum(
        prometheus_client.REGISTRY.get_sample_value("conveyor_messages_total", {"handler": handler, "outcome": o})
        or 0.0
        for o in ("succeeded", "dead_lettered", "duplicate")
    )


async def quiet(setup: Setup, handler: str, deliveries: int) -> None:
    """Wait until ``handler`` finished ``deliveries`` deliveries and the relay sent every outbox row.

    After that nothing is left that could publish again (in place of a pause for
    a wrong late copy to arrive).
    """
    await wait_for(lambda: finished(handler) >= deliveries, 10, f"{handler} to finish {deliveries} deliveries")
    await wait_until(lambda: nothing_unsent(setup.db), 10, "the relay to send every outbox row")


async def nothing_unsent(db: Database) -> bool:
    return await unsent(db) == 0


async def audit_copies(setup: Setup) -> int:
    """Audit messages received, once everything published before reached the collector.

    Call it with the worker and the relay stopped: the memory broker delivers in
    order, so a marker published now arrives after any earlier copy.
    """
    setup.transport.failures = 0
    marker = unique("marker").encode()
    await setup.transport.publish(setup.audit_topic, envelope.WireMessage(marker))
    await wait_for(lambda: marker in setup.audit.bodies(), 10, "the marker behind every audit message")
    assert setup.audit.bodies()[-1] == marker
    return len(setup.audit.received) - 1


async def test_publish_refused_after_the_transaction_block_is_delivered_once_after_retry(setup: Setup) -> None:
    attempts: list[int] = []
    name = unique("uow")

    @on(setup.topic, name=name, backoff=FAST)
    async def charge(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.attempt)
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id, 'charge')"), {"id": ctx.message.id})
        ctx.publish(setup.audit_topic, {"charged": ctx.message.id})

    async with running(setup, charge):
        event_id = await send(setup)
        await setup.audit.wait(1)
        await quiet(setup, name, 1)
    assert (await ledger(setup.db), await audit_copies(setup)) == ([(event_id, "charge")], 1)


async def test_exception_after_the_transaction_block_rolls_back_and_the_retry_completes(setup: Setup) -> None:
    attempts: list[int] = []

    @on(setup.topic, name=unique("uow"), backoff=FAST)
    async def charge(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.attempt)
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id, 'charge')"), {"id": ctx.message.id})
        if ctx.message.attempt == 1:
            raise RuntimeError("fails after the block")
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id, 'receipt')"), {"id": ctx.message.id})

    async with running(setup, charge):
        event_id = await send(setup)
        await wait_for(lambda: attempts == [1, 2], 10, "the retry")
    assert await ledger(setup.db) == [(event_id, "charge"), (event_id, "receipt")]


async def test_timeout_after_the_transaction_block_rolls_back_and_the_retry_completes(setup: Setup) -> None:
    attempts: list[int] = []

    @on(setup.topic, name=unique("uow"), backoff=FAST, timeout=0.3)
    async def slow(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.attempt)
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id, 'write')"), {"id": ctx.message.id})
        if ctx.message.attempt == 1:
            await asyncio.sleep(5)
        ctx.publish(setup.audit_topic, {"done": ctx.message.id})

    setup.transport.failures = 0
    async with running(setup, slow):
        event_id = await send(setup)
        await setup.audit.wait(1)
    assert (await ledger(setup.db), attempts) == ([(event_id, "write")], [1, 2])


async def test_a_duplicate_delivery_of_a_committed_attempt_publishes_nothing_again(setup: Setup) -> None:
    runs: list[int] = []
    name = unique("uow")

    @on(setup.topic, name=name, backoff=FAST)
    async def charge(payload: dict, ctx: Context) -> None:
        ctx.publish(setup.audit_topic, {"before": True})  # published before the transaction opens
        runs.append(ctx.message.attempt)
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id, 'charge')"), {"id": ctx.message.id})

    setup.transport.failures = 0
    async with running(setup, charge):
        event = envelope.create(setup.topic, {"n": 1}, source="t")
        wire = envelope.to_binary(event, setup.transport.binary_prefix)
        await setup.transport.publish(setup.topic, wire)
        await setup.audit.wait(1)
        await setup.transport.publish(setup.topic, wire)
        await wait_for(lambda: len(runs) == 2, 10, "the duplicate delivery")
        await quiet(setup, name, 2)
    assert (await ledger(setup.db), await audit_copies(setup)) == ([(event.id, "charge")], 1)


async def test_messages_published_without_a_database_keep_their_ids_on_retry(setup: Setup) -> None:
    second = unique("second")
    received = Collector()
    await setup.transport.subscribe(ports.Subscription(name=unique("s"), topic=second), received)
    setup.transport.flaky_topic = second  # the second publish of the first attempt fails

    @on(setup.topic, name=unique("uow"), backoff=FAST)
    async def fan_out(payload: dict, ctx: Context) -> None:
        ctx.publish(setup.audit_topic, {"n": 1})
        ctx.publish(second, {"n": 2})

    worker = Worker(registry.Registry.of(fan_out).handlers, setup.transport, source="t")
    await worker.start()
    await send(setup)
    await received.wait(1)
    await setup.audit.wait(2)
    await worker.stop(5)
    ids = [r.message.message_id for r in setup.audit.received]
    assert ids[0] == ids[1]


def test_a_sync_transactional_handler_is_refused_at_registration() -> None:
    with pytest.raises(ConfigurationError, match="sync_handler"):

        @on("uow.sync", name="uow.sync", transactional=True)
        def sync_handler(payload: dict, ctx: Context) -> None: ...


async def test_a_sync_handler_opening_a_transaction_gets_a_clear_error(setup: Setup) -> None:
    errors_seen: list[BaseException] = []

    @on(setup.topic, name=unique("uow"), max_attempts=1)
    def sync_handler(payload: dict, ctx: Context) -> None:
        try:
            with ctx.transaction():  # type: ignore[attr-defined]
                pass
        except BaseException as exc:
            errors_seen.append(exc)
            raise

    async with running(setup, sync_handler):
        await send(setup)
        await wait_for(lambda: bool(errors_seen), 10, "the handler")
    assert isinstance(errors_seen[0], ConfigurationError) and "async def" in str(errors_seen[0])


async def test_a_transactional_handler_skips_a_duplicate_before_running(setup: Setup) -> None:
    runs: list[str] = []
    name = unique("uow")

    @on(setup.topic, name=name, transactional=True)
    async def record(payload: dict, ctx: Context) -> None:
        runs.append(ctx.message.id)
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects VALUES (:id, 'tx')"), {"id": ctx.message.id})

    setup.transport.failures = 0
    async with running(setup, record):
        event = envelope.create(setup.topic, {"n": 1}, source="t")
        wire = envelope.to_binary(event, setup.transport.binary_prefix)
        for _ in range(2):
            await setup.transport.publish(setup.topic, wire)
        await wait_for(lambda: len(runs) >= 1, 10, "the first run")
        await wait_for(lambda: finished(name) == 2, 10, "the duplicate to be settled")
    assert (runs, await ledger(setup.db)) == ([event.id], [(event.id, "tx")])
