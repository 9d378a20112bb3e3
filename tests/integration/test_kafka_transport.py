"""Kafka transport behaviour beyond the conformance suites, on Tansu.

CloudEvents interoperability with producers and consumers that are not
Conveyor, partition splitting in a group, offset-commit order, durable retries,
slow handlers, reconnects and configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from cloudevents.core.bindings import kafka as ce_kafka
from conveyor import envelope, errors, ports
from conveyor.envelope import WireMessage
from conveyor.testing import Collector, brokers, unique, wait_for
from conveyor.testing.servers import TansuBroker
from conveyor.transports import kafka_consume
from conveyor.transports.kafka import KafkaOptions, KafkaTransport, parse_url

FAST = "session_timeout_ms=2000&heartbeat_interval_ms=400&partitions=4"
TIMEOUT = 30.0

Open = Callable[..., Awaitable[KafkaTransport]]


async def keep(delivery: ports.Delivery) -> None:
    """A settle policy that leaves deliveries unsettled."""


@pytest.fixture
async def open_kafka(kafka_url: str) -> AsyncIterator[Open]:
    """Open transports on the session broker (extra URL options allowed); close them at teardown."""
    opened: list[KafkaTransport] = []

    async def open_one(extra: str = "", url: str = kafka_url) -> KafkaTransport:
        transport = KafkaTransport(brokers.with_query(url, f"{FAST}{'&' + extra if extra else ''}"))
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in reversed(opened):
        await transport.close()


@pytest.fixture
def own_broker() -> Iterator[TansuBroker]:
    """A Tansu broker of this test alone (it is restarted or stopped)."""
    with TansuBroker() as broker:
        yield broker


async def plain_producer(bootstrap: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    return producer


def bootstrap_of(url: str) -> str:
    return ",".join(parse_url(url)[0])


async def subscribe(transport: KafkaTransport, sub: ports.Subscription, collector: Collector) -> ports.Consumer:
    consumer = await transport.subscribe(sub, collector)
    await wait_for(lambda: consumer.active, TIMEOUT, "the consumer to get partitions")
    return consumer


# -- CloudEvents interoperability ----------------------------------------------


async def test_binary_mode_record_from_a_plain_producer_decodes(open_kafka: Open, kafka_url: str) -> None:
    transport, topic = await open_kafka(), unique("kx")
    sub = ports.Subscription(unique("sub"), topic)
    await transport.declare([topic], [sub])
    producer = await plain_producer(bootstrap_of(kafka_url))
    headers = [
        ("ce_specversion", b"1.0"), ("ce_id", b"evt-1"), ("ce_source", b"/billing"),
        ("ce_type", b"invoice.paid"), ("ce_time", b"2024-05-01T12:00:00Z"),
        ("content-type", b"application/json"),
    ]  # fmt: skip
    try:
        await producer.send_and_wait(topic, b'{"invoice": 7}', key=b"cust-9", headers=headers)
    finally:
        await producer.stop()
    collector = Collector()
    await transport.subscribe(sub, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    event = envelope.decode(got.message)
    assert (event.id, event.source, event.type, event.key, event.json()) == (
        "evt-1", "/billing", "invoice.paid", "cust-9", {"invoice": 7},
    )  # fmt: skip


async def test_structured_mode_record_from_a_plain_producer_decodes(open_kafka: Open, kafka_url: str) -> None:
    transport, topic = await open_kafka(), unique("kx")
    sub = ports.Subscription(unique("sub"), topic)
    await transport.declare([topic], [sub])
    body = orjson.dumps(
        {"specversion": "1.0", "id": "evt-2", "source": "/shop", "type": "order.placed",
         "datacontenttype": "application/json", "data": {"order_id": "o-1"}}
    )  # fmt: skip
    producer = await plain_producer(bootstrap_of(kafka_url))
    try:
        await producer.send_and_wait(topic, body, headers=[("content-type", b"application/cloudevents+json")])
    finally:
        await producer.stop()
    collector = Collector()
    await transport.subscribe(sub, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    event = envelope.decode(got.message)
    assert (event.id, event.type, event.json()) == ("evt-2", "order.placed", {"order_id": "o-1"})


async def test_published_record_decodes_with_the_cloudevents_sdk(open_kafka: Open, kafka_url: str) -> None:
    transport, topic = await open_kafka(), unique("kx")
    await transport.declare([topic], [])
    sent = envelope.create("order.placed", {"order_id": "o-1"}, source="shop", key="o-1", subject="orders/o-1")
    await transport.publish(topic, envelope.to_binary(sent, transport.binary_prefix))
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap_of(kafka_url), auto_offset_reset="earliest")
    await reader.start()
    try:
        record = await asyncio.wait_for(reader.getone(), TIMEOUT)
    finally:
        await reader.stop()
    message = ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
    event = ce_kafka.from_kafka_event(message)
    attributes = event.get_attributes()
    assert (attributes["id"], attributes["source"], attributes["type"], attributes["subject"]) == (
        sent.id, "shop", "order.placed", "orders/o-1",
    )  # fmt: skip
    assert (attributes["partitionkey"], event.get_data()) == ("o-1", {"order_id": "o-1"})


# -- groups, commits, retries -------------------------------------------------------


async def test_two_transports_in_one_group_split_partitions_and_handle_each_message_once(open_kafka: Open) -> None:
    first, second = await open_kafka(), await open_kafka()
    topic = unique("kx")
    sub = ports.Subscription(unique("sub"), topic)
    a, b = Collector(), Collector()
    consumers = [await first.subscribe(sub, a), await second.subscribe(sub, b)]
    await wait_for(lambda: all(c.active for c in consumers), TIMEOUT, "both consumers to get partitions")
    keys = [f"k{i}" for i in range(16)]
    for n in range(5):
        for key in keys:
            await first.publish(topic, WireMessage(f"{key}:{n}".encode(), key=key))
    await wait_for(lambda: len(a.received) + len(b.received) >= 80, TIMEOUT, "80 deliveries")
    await asyncio.sleep(0.3)  # let a duplicate, if any, arrive
    bodies = a.bodies() + b.bodies()
    assert sorted(bodies) == sorted(f"{k}:{n}".encode() for k in keys for n in range(5))
    keys_a = {r.message.key for r in a.received}
    keys_b = {r.message.key for r in b.received}
    assert keys_a and keys_b and not keys_a & keys_b, "each key's partition belongs to one member"


async def test_out_of_order_acks_do_not_commit_past_an_unsettled_record(open_kafka: Open) -> None:
    transport, topic = await open_kafka(), unique("kx")
    sub = ports.Subscription(unique("sub"), topic, prefetch=10)
    await transport.declare([topic], [sub])
    for n in range(3):
        await transport.publish(topic, WireMessage(str(n).encode(), key="one-partition"))

    async def ack_all_but_first(delivery: ports.Delivery) -> None:
        if delivery.message.body != b"0":
            await delivery.ack()

    first = Collector(settle=ack_all_but_first)
    await transport.subscribe(sub, first)
    await first.wait(3, TIMEOUT)
    await transport.close()
    again = Collector()
    await (await open_kafka()).subscribe(sub, again)
    await again.wait(3, TIMEOUT)
    assert again.bodies() == [b"0", b"1", b"2"]


async def test_nacked_message_comes_back_with_its_attempt_after_a_consumer_restart(open_kafka: Open) -> None:
    transport, topic = await open_kafka(), unique("kx")
    sub = ports.Subscription(unique("sub"), topic)
    await transport.declare([topic], [sub])
    await transport.publish(topic, WireMessage(b"retry-me", {"x-a": "1"}, key="k", message_id="m-1"))

    nacked = asyncio.Event()

    async def nack(delivery: ports.Delivery) -> None:
        await delivery.nack(1.5)
        nacked.set()

    first = Collector(settle=nack)
    await transport.subscribe(sub, first)
    await asyncio.wait_for(nacked.wait(), TIMEOUT)
    await transport.close()  # the worker goes away during the delay
    again = Collector()
    await (await open_kafka()).subscribe(sub, again)
    (got,) = await again.wait(1, TIMEOUT)
    message = got.message
    assert (got.attempt, message.body, message.headers, message.key, message.message_id) == (
        2, b"retry-me", {"x-a": "1"}, "k", "m-1",
    )  # fmt: skip
    assert got.at - first.received[0].at >= 1.4


async def test_short_retry_is_not_held_behind_a_longer_one_of_the_same_key(open_kafka: Open) -> None:
    transport, topic = await open_kafka(), unique("kx")
    sub = ports.Subscription(unique("sub"), topic)
    await transport.declare([topic], [sub])
    for body in (b"long", b"short"):  # one key: one partition, also in the retry topic
        await transport.publish(topic, WireMessage(body, key="k"))

    async def nack_once(delivery: ports.Delivery) -> None:
        if delivery.attempt > 1:
            await delivery.ack()
        else:
            await delivery.nack(8.0 if delivery.message.body == b"long" else 0.3)

    collector = Collector(settle=nack_once)
    await transport.subscribe(sub, collector)
    await wait_for(lambda: len(collector.received) >= 3, TIMEOUT, "the short retry")
    assert [(r.message.body, r.attempt) for r in collector.received] == [(b"long", 1), (b"short", 1), (b"short", 2)]


async def test_slow_handler_beyond_max_poll_interval_causes_no_redelivery(open_kafka: Open) -> None:
    transport = await open_kafka("max_poll_interval_ms=2500")
    topic = unique("kx")
    sub = ports.Subscription(unique("sub"), topic, prefetch=1)
    await transport.declare([topic], [sub])
    for body in (b"slow", b"next"):
        await transport.publish(topic, WireMessage(body, key="k"))

    async def slow(delivery: ports.Delivery) -> None:
        async def later() -> None:
            await asyncio.sleep(4.0)  # the handler outlives max_poll_interval_ms
            await delivery.ack()

        asyncio.get_running_loop().create_task(later())

    collector = Collector(settle=slow)
    await transport.subscribe(sub, collector)
    await wait_for(lambda: b"next" in collector.bodies(), TIMEOUT, "the second message")
    await asyncio.sleep(0.5)
    assert collector.bodies() == [b"slow", b"next"]


async def test_message_id_and_headers_round_trip(open_kafka: Open) -> None:
    transport, topic = await open_kafka(), unique("kx")
    sub = ports.Subscription(unique("sub"), topic)
    await transport.declare([topic], [sub])
    await transport.publish(topic, WireMessage(b"x", {"ce_id": "e-1", "h": "ü"}, key="ключ", message_id="m-7"))
    collector = Collector()
    await transport.subscribe(sub, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    assert (got.message.message_id, got.message.headers, got.message.key) == ("m-7", {"ce_id": "e-1", "h": "ü"}, "ключ")


class FailingFetch:
    """A stand-in for ``AIOKafkaConsumer`` whose fetches fail until told otherwise."""

    def __init__(self, record: object) -> None:
        self.failing = True
        self.record = record
        self.calls = 0

    async def getmany(
        self, *partitions: object, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[object]]:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.failing:
            raise KafkaConnectionError("broker away")
        record, self.record = self.record, None
        return {TopicPartition("t", 0): [record]} if record else {}

    def pause(self, *partitions: object) -> None: ...

    def resume(self, *partitions: object) -> None: ...


async def not_used(*args: object) -> None:
    raise AssertionError("not expected in this test")


async def test_fetch_loop_survives_fetch_errors_and_is_inactive_meanwhile() -> None:
    record = SimpleNamespace(topic="t", partition=0, offset=0, key=None, value=b"after the outage", headers=())
    fake = FailingFetch(record)
    collector = Collector(settle=keep)
    consumer = kafka_consume.KafkaConsumer(
        fake, ports.Subscription("s", "t"), "_conveyor.retry.s", collector, not_used, 1.0, not_used
    )
    await consumer.assigned({TopicPartition("t", 0)})
    consumer._task = asyncio.get_running_loop().create_task(consumer._run())
    try:
        await wait_for(lambda: fake.calls >= 3, TIMEOUT, "failed fetches")
        assert not consumer.active
        fake.failing = False
        await collector.wait(1, TIMEOUT)
        assert consumer.active
    finally:
        consumer._task.cancel()
        await asyncio.gather(consumer._task, return_exceptions=True)


# -- broker failures ----------------------------------------------------------------


async def test_consumer_survives_a_broker_restart(own_broker: TansuBroker) -> None:
    """A consumer keeps running across a broker restart and consumes what is published after it.

    Tansu keeps nothing across a restart (memory storage), so a "restart
    mid-stream without loss" test is impossible here: topics, records and
    committed offsets are gone. This checks the failure mode that matters for
    clients (consumers that never come back): the same consumer reconnects,
    rejoins its group and receives messages published after the restart, once
    ``declare`` has recreated the topics.
    """
    transport = KafkaTransport(brokers.with_query(own_broker.url, f"{FAST}&request_timeout_ms=5000"))
    await transport.connect()
    try:
        topic = unique("kx")
        sub = ports.Subscription(unique("sub"), topic)
        await transport.declare([topic], [sub])
        collector = Collector()
        consumer = await subscribe(transport, sub, collector)
        await transport.publish(topic, WireMessage(b"before"))
        await collector.wait(1, TIMEOUT)
        await asyncio.to_thread(own_broker.restart)
        await transport.declare([topic], [sub])
        await publish_until_accepted(transport, topic, WireMessage(b"after"))
        await wait_for(lambda: b"after" in collector.bodies(), TIMEOUT * 2, "the message published after the restart")
        await wait_for(lambda: consumer.active, TIMEOUT, "the consumer to be active again")
    finally:
        await transport.close()


async def publish_until_accepted(transport: KafkaTransport, topic: str, message: WireMessage) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                await transport.publish(topic, message)
                return
            except errors.TransientTransportError:
                await asyncio.sleep(0.2)


async def test_check_raises_transport_error_when_the_broker_is_down(own_broker: TansuBroker) -> None:
    transport = KafkaTransport(brokers.with_query(own_broker.url, "request_timeout_ms=2000"))
    await transport.connect()
    try:
        await transport.check()
        await asyncio.to_thread(own_broker.stop)
        with pytest.raises(errors.TransportError):
            await transport.check()
    finally:
        await transport.close()


async def test_connect_to_a_closed_port_raises_transient_error() -> None:
    from conveyor.testing.brokers import free_port

    transport = KafkaTransport(f"kafka://127.0.0.1:{free_port()}?request_timeout_ms=2000")
    with pytest.raises(errors.TransientTransportError):
        await transport.connect()


async def test_publish_after_close_raises_transport_error(open_kafka: Open) -> None:
    transport, topic = await open_kafka(), unique("kx")
    await transport.declare([topic], [])
    await transport.close()
    with pytest.raises(errors.TransportError):
        await transport.publish(topic, WireMessage(b"late"))


# -- topology and configuration ----------------------------------------------------


async def test_declare_warns_about_an_existing_topic_with_fewer_partitions(
    open_kafka: Open, kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = unique("kx")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_of(kafka_url))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    transport = await open_kafka()
    with caplog.at_level(logging.WARNING, "conveyor.transports.kafka"):
        await transport.declare([topic], [])
    assert f"Kafka topic {topic} has 2 partition(s)" in caplog.text


def test_url_options_are_parsed() -> None:
    servers, options = parse_url("kafka://a:9093,b?partitions=12&session_timeout_ms=6000")
    assert (servers, options.partitions, options.session_timeout_ms) == (["a:9093", "b:9092"], 12, 6000)
    assert options.heartbeat_interval_ms == KafkaOptions().heartbeat_interval_ms


@pytest.mark.parametrize(
    "url",
    ["kafka://", "kafka://h:1?partitions=0", "kafka://h:1?partitons=4", "kafka://h:1?partitions=many", "nats://h:1"],
)
def test_invalid_url_raises_configuration_error(url: str) -> None:
    with pytest.raises(errors.ConfigurationError):
        KafkaTransport(url)


def test_url_producer_is_idempotent_unless_turned_off() -> None:
    defaults, off = parse_url("kafka://a:9092")[1], parse_url("kafka://a:9092?idempotence=0")[1]
    assert (defaults.idempotence, off.idempotence) == (1, 0)


def test_url_idempotence_other_than_0_or_1_is_refused() -> None:
    with pytest.raises(errors.ConfigurationError, match="idempotence"):
        parse_url("kafka://a:9092?idempotence=2")


def test_url_revoke_grace_of_half_the_rebalance_timeout_is_refused() -> None:
    with pytest.raises(errors.ConfigurationError, match="revoke_grace_ms"):
        parse_url("kafka://a:9092?session_timeout_ms=6000&revoke_grace_ms=3000")
