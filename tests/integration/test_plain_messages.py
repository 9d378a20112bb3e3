"""Plain JSON from each broker's own client: one effect however often it is redelivered, or a dead letter.

The producers here are the brokers' plain clients (aio-pika, nats-py, aiokafka)
with no CloudEvents attributes at all. A ``plain=True`` handler writes its
effect in ``ctx.transaction()``; the test makes the broker deliver the message
three times *after* the effect committed (the first two acks become nacks, as
if the acknowledgement had been lost), so only an event id that is stable
across redeliveries (the broker's id of the message) keeps it to one effect.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import nats
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from conveyor import Context, on, ports, registry, telemetry
from conveyor.runtime import app
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique, wait_for
from dlq_helpers import peek_until

from event_store import Database

KAFKA_FAST = "?partitions=1&session_timeout_ms=2000&heartbeat_interval_ms=400"
Open = Callable[[], Awaitable[ports.Transport]]
BODY = b'{"order_id": "o-1", "total_cents": 250}'


@pytest.fixture(params=["rabbit", "nats", "kafka"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Real brokers only (overrides the integration default): plain producers need one."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    return brokers.with_query(url, KAFKA_FAST) if request.param == "kafka" else url


async def publish_plain(url: str, topic: str, body: bytes) -> str | None:
    """Publish ``body`` with the broker's own client and no CloudEvents attribute; return the id it was sent with."""
    if url.startswith("amqp"):
        message_id = f"amqp-{uuid.uuid4()}"
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("conveyor")
            message = aio_pika.Message(body, content_type="application/json", message_id=message_id)
            await exchange.publish(message, routing_key=topic)
        return message_id
    if url.startswith("nats"):
        message_id = f"nats-{uuid.uuid4()}"
        client = await nats.connect(url)
        try:
            await client.jetstream().publish(f"conveyor.{topic}", body, headers={"Nats-Msg-Id": message_id})
        finally:
            await client.close()
        return message_id
    producer = AIOKafkaProducer(bootstrap_servers=url.removeprefix("kafka://").split("?", 1)[0])
    await producer.start()
    try:
        await producer.send_and_wait(topic, body, headers=[("content-type", b"application/json")])
    finally:
        await producer.stop()
    return None  # the transport names it <topic>/<partition>/<offset>


class LostAck:
    """A delivery whose acknowledgement is lost: acking it nacks it, so the broker delivers the message again."""

    def __init__(self, delivery: ports.Delivery) -> None:
        self._delivery = delivery

    def __getattr__(self, name: str) -> Any:
        return getattr(self._delivery, name)

    async def ack(self) -> None:
        await self._delivery.nack(0.0)


def lose_acks(transport: ports.Transport, name: str, count: int) -> None:
    """Lose the acknowledgement of the first ``count`` deliveries of subscription ``name``."""
    subscribe = transport.subscribe

    async def losing(subscription: ports.Subscription, callback: ports.DeliveryCallback) -> ports.Consumer:
        if subscription.name != name:
            return await subscribe(subscription, callback)
        lost = [0]

        async def handle(delivery: ports.Delivery) -> None:
            if lost[0] < count:
                lost[0] += 1
                delivery = LostAck(delivery)  # type: ignore[assignment]
            await callback(delivery)

        return await subscribe(subscription, handle)

    transport.subscribe = losing  # type: ignore[method-assign]


async def effects(db: Database) -> list[str]:
    async with db.transaction(readonly=True) as session:
        return list((await session.execute(sa.text("SELECT order_id FROM plain_effects"))).scalars())


async def test_plain_message_redelivered_twice_after_its_commit_has_one_effect(
    broker_url: str, open_transport: Open, pg_db: Database
) -> None:
    async with pg_db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE plain_effects (order_id text NOT NULL)"))
    topic, name = unique("plain"), unique("plain")
    deliveries: list[tuple[int, str, str]] = []

    @on(topic, name=name, plain=True)
    async def record(order: dict, ctx: Context) -> None:
        deliveries.append((ctx.message.attempt, ctx.message.id, ctx.message.source))
        async with ctx.transaction() as tx:  # a redelivery stops here: the inbox has the id
            await tx.session.execute(sa.text("INSERT INTO plain_effects VALUES (:id)"), {"id": order["order_id"]})

    transport = await open_transport()
    lose_acks(transport, name, 2)
    units = app.stores_for(pg_db, "t").units
    worker = Worker(registry.Registry.of(record).handlers, transport, source="t", transactions=units)
    await worker.start()
    sent_id = await publish_plain(broker_url, topic, BODY)
    await wait_for(lambda: len(deliveries) == 3, 15, "three deliveries of the plain message")
    assert await worker.stop(5)
    assert await effects(pg_db) == ["o-1"]
    ids, sources = {event_id for _, event_id, _ in deliveries}, {source for _, _, source in deliveries}
    assert len(ids) == 1 and (sent_id is None or ids == {sent_id}), deliveries
    assert sources == {f"conveyor:plain:{telemetry.messaging_system(transport)}"}


async def test_plain_message_to_a_handler_without_plain_is_dead_lettered(broker_url: str, open_transport: Open) -> None:
    topic, handled = unique("plain"), []

    @on(topic, name=unique("plain"))
    async def strict(payload: dict) -> None:
        handled.append(payload)

    transport = await open_transport()
    worker = Worker(registry.Registry.of(strict).handlers, transport, source="t")
    await worker.start()
    await publish_plain(broker_url, topic, BODY)
    letters = await peek_until(open_transport, topic)
    assert await worker.stop(5)
    assert handled == [] and [(d.error_type, d.error[:16]) for d in letters] == [("InvalidMessage", "not a CloudEvent")]
