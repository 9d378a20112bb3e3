"""FastStream and Conveyor on one broker: a FastStream app publishes to Conveyor, and consumes from it.

Each test runs on RabbitMQ, NATS JetStream and Kafka with the wire names of
the README's table (exchange ``conveyor`` and routing key = topic; subject
``conveyor.<topic>`` in stream ``CONVEYOR``; Kafka topic = topic). FastStream
publishes plain JSON, which a ``plain=True`` handler accepts; Conveyor publishes
CloudEvents in binary mode, which a FastStream subscriber reads as a JSON body
plus ``ce`` headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import conveyor
import faststream
import nats
import pytest
from conveyor import Context, on, ports, registry, transports
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique, wait_for
from faststream.kafka import KafkaBroker
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

KAFKA_FAST = "?partitions=1&session_timeout_ms=2000&heartbeat_interval_ms=400"
Open = Callable[[], Awaitable[ports.Transport]]
Received = list[tuple[Any, dict[str, str]]]
# Conveyor declares the exchange and the stream; FastStream must only bind to them.
EXCHANGE = RabbitExchange("conveyor", type=ExchangeType.TOPIC, durable=True, declare=False)
STREAM = JStream("CONVEYOR", declare=False)
PREFIXES = ("cloudevents_", "ce_", "ce-")  # the AMQP, Kafka and NATS bindings' header prefixes


@pytest.fixture(params=["rabbit", "nats", "kafka"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Real brokers only (overrides the integration default)."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    return brokers.with_query(url, KAFKA_FAST) if request.param == "kafka" else url


def faststream_broker(url: str) -> RabbitBroker | NatsBroker | KafkaBroker:
    if url.startswith("amqp"):
        return RabbitBroker(url)
    if url.startswith("nats"):
        return NatsBroker(url)
    return KafkaBroker(url.removeprefix("kafka://").split("?", 1)[0])


async def faststream_publish(broker: RabbitBroker | NatsBroker | KafkaBroker, topic: str, data: dict) -> None:
    """Publish ``data`` as FastStream does (plain JSON), to Conveyor's wire name of ``topic``."""
    if isinstance(broker, RabbitBroker):
        await broker.publish(data, routing_key=topic, exchange=EXCHANGE)
    elif isinstance(broker, NatsBroker):
        await broker.publish(data, subject=f"conveyor.{topic}", stream="CONVEYOR")
    else:
        await broker.publish(data, topic=topic, key=b"o-1")


def faststream_subscribe(broker: RabbitBroker | NatsBroker | KafkaBroker, topic: str, received: Received) -> str:
    """Subscribe a FastStream handler to Conveyor's wire name of ``topic`` (it records body and headers).

    Returns:
        The name of the queue, durable or group it consumes with.
    """
    name = unique("fs").replace(".", "-")

    async def record(body: dict, message: Annotated[Any, faststream.Context("message")]) -> None:
        received.append((body, dict(message.headers)))

    if isinstance(broker, RabbitBroker):
        queue = RabbitQueue(name, auto_delete=True, routing_key=topic)
        broker.subscriber(queue, EXCHANGE)(record)
    elif isinstance(broker, NatsBroker):
        # A durable pull consumer, as FastStream recommends; the stream is bound to, never declared.
        broker.subscriber(f"conveyor.{topic}", stream=STREAM, durable=name, pull_sub=PullSub(timeout=0.5))(record)
    else:
        broker.subscriber(topic, group_id=name, auto_offset_reset="earliest")(record)
    return name


async def conveyor_stream(url: str, drop_durable: str | None = None) -> Any:
    """The configuration of NATS stream ``CONVEYOR`` (after deleting a durable consumer of it, if named)."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        if drop_durable is not None:
            await js.delete_consumer("CONVEYOR", drop_durable)
        return (await js.stream_info("CONVEYOR")).config
    finally:
        await client.close()


@pytest.fixture
async def started() -> AsyncIterator[list[RabbitBroker | NatsBroker | KafkaBroker]]:
    """FastStream brokers the test started; stopped after it."""
    running: list[RabbitBroker | NatsBroker | KafkaBroker] = []
    yield running
    for broker in running:
        await broker.stop()


async def test_faststream_publisher_reaches_a_plain_handler_once(
    broker_url: str, open_transport: Open, started: list[Any]
) -> None:
    topic, seen = unique("fs"), []

    @on(topic, name=unique("fs"), plain=True)
    async def handle(order: dict, ctx: Context) -> None:
        seen.append((order, ctx.message.type))

    worker = Worker(registry.Registry.of(handle).handlers, await open_transport(), source="t")
    await worker.start()
    broker = faststream_broker(broker_url)
    started.append(broker)
    await broker.start()
    await faststream_publish(broker, topic, {"order_id": "o-1"})
    await wait_for(lambda: bool(seen), 10, "the FastStream message")
    await asyncio.sleep(0.5)  # room for a second, wrong delivery
    assert await worker.stop(5)
    assert seen == [({"order_id": "o-1"}, topic)]


async def test_faststream_subscriber_reads_what_conveyor_publishes(
    broker_url: str, open_transport: Open, started: list[Any]
) -> None:
    topic, received = unique("fs"), []
    transport = await open_transport()
    await transport.declare([topic], [])  # the exchange, stream and topic FastStream binds to
    broker = faststream_broker(broker_url)
    consumer = faststream_subscribe(broker, topic, received)
    started.append(broker)
    await broker.start()
    await asyncio.sleep(1.0 if isinstance(broker, KafkaBroker) else 0)  # the group joins before the publish
    async with conveyor.Publisher(broker_url, source="shop") as publisher:
        event = await publisher.publish(topic, {"order_id": "o-1"}, key="o-1")
    await wait_for(lambda: bool(received), 10, "the Conveyor event")
    await broker.stop()
    if isinstance(broker, NatsBroker):
        await conveyor_stream(broker_url, drop_durable=consumer)
    [(body, headers)] = received
    ce = {name.lower()[len(p) :]: v for name, v in headers.items() for p in PREFIXES if name.lower().startswith(p)}
    assert body == {"order_id": "o-1"}
    assert (ce["id"], ce["source"], ce["type"], ce["specversion"]) == (event.id, "shop", topic, "1.0")


async def test_faststream_jetstream_subscriber_leaves_the_conveyor_stream_as_it_is(
    nats_url: str, open_transport_nats: Open, started: list[Any]
) -> None:
    await open_transport_nats()  # a Conveyor transport declares stream CONVEYOR
    before = await conveyor_stream(nats_url)
    broker = NatsBroker(nats_url)
    consumer = faststream_subscribe(broker, unique("fs"), [])
    started.append(broker)
    await broker.start()
    await broker.stop()
    assert await conveyor_stream(nats_url, drop_durable=consumer) == before


@pytest.fixture
async def open_transport_nats(nats_url: str) -> AsyncIterator[Open]:
    """Opens connected NATS transports, closed after the test."""
    opened: list[ports.Transport] = []

    async def open_one() -> ports.Transport:
        transport = transports.create(nats_url)
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in opened:
        await transport.close()
