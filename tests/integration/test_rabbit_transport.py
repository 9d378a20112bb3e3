"""RabbitMQ transport behaviour beyond the conformance suites (needs the local RabbitMQ).

Topology reconciliation, delay tiers, attempt counting, a broker restart, and
CloudEvents interoperability with plain aio-pika clients and the CloudEvents SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aio_pika
import aiormq
import orjson
import pytest
import relay_helpers
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from conveyor import envelope, errors, ports
from conveyor.envelope import WireMessage
from conveyor.runtime.relay import Relay
from conveyor.testing import Collector, brokers, unique, wait_for
from conveyor.transports import rabbit_wire
from conveyor.transports.rabbit import RabbitTransport
from pamqp.commands import Basic
from rabbit_raw import publish_undecodable

from event_store import Database, SqlOutboxStore

TIMEOUT = 20.0
Open = Callable[..., Awaitable[RabbitTransport]]


@pytest.fixture
async def open_rabbit(rabbit_url: str) -> AsyncIterator[Open]:
    """Open transports on demand; close them and delete the queues they declared at teardown."""
    opened: list[RabbitTransport] = []
    declared: dict[str, ports.Subscription] = {}

    async def open_one(**options: object) -> RabbitTransport:
        transport = RabbitTransport(rabbit_url, reconnect_max=1.0, **options)  # type: ignore[arg-type]
        original = transport.declare

        async def declare(topics: list[str], subs: list[ports.Subscription]) -> None:
            declared.update((s.name, s) for s in subs)
            await original(topics, subs)

        transport.declare = declare  # type: ignore[method-assign]
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in opened:
        await transport.close()
    queues = brokers.rabbit_subscription_queues(RabbitTransport(rabbit_url), list(declared.values()))
    await brokers.delete_rabbit_queues(rabbit_url, queues)


@pytest.fixture
async def raw_channel(rabbit_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel (a 'foreign' client that does not use Conveyor)."""
    async with await aio_pika.connect(rabbit_url) as connection:
        yield await connection.channel()


@pytest.fixture
async def own_tier(rabbit_url: str) -> AsyncIterator[float]:
    """A delay tier (seconds) no other test uses; its exchange and queue are deleted at teardown."""
    ms = 51 + 2 * secrets.randbelow(500)  # odd: never one of the default tiers
    yield ms / 1000
    name = rabbit_wire.tier_name("conveyor", ms)
    async with await aio_pika.connect(rabbit_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
        await channel.exchange_delete(name)


async def publish_raw(channel: aio_pika.abc.AbstractChannel, topic: str, message: aio_pika.Message) -> None:
    exchange = await channel.get_exchange("conveyor")
    await exchange.publish(message, routing_key=topic)


async def receive_from_plain_client(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel, message: aio_pika.Message
) -> envelope.Envelope:
    """Publish ``message`` with plain aio-pika to a fresh topic; return the event our transport decodes."""
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    await publish_raw(raw_channel, topic, message)
    collector = Collector()
    await transport.subscribe(subscription, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    return envelope.decode(got.message)


def sub(topic: str, **options: object) -> ports.Subscription:
    return ports.Subscription(name=unique("rt"), topic=topic, **options)  # type: ignore[arg-type]


async def keep(delivery: ports.Delivery) -> None:
    """Leave a delivery unsettled."""


# -- topology ------------------------------------------------------------------------


async def test_subscription_moved_to_another_topic_stops_receiving_the_old_topic(
    open_rabbit: Open,
) -> None:
    transport = await open_rabbit()
    old, new = unique("rt"), unique("rt")
    before = sub(old)
    await transport.declare([old], [before])
    moved = ports.Subscription(name=before.name, topic=new)
    await transport.declare([new], [moved])
    with pytest.raises(errors.TransportError):  # no queue is bound to the old topic any more: returned
        await transport.publish(old, WireMessage(b"old topic"))


async def test_subscription_moved_to_another_topic_receives_the_new_topic(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    old, new = unique("rt"), unique("rt")
    before = sub(old)
    await transport.declare([old], [before])
    moved = ports.Subscription(name=before.name, topic=new)
    await transport.declare([new], [moved])
    await transport.publish(new, WireMessage(b"new topic"))
    collector = Collector()
    await transport.subscribe(moved, collector)
    await collector.wait(1, TIMEOUT)


async def test_redeclare_with_the_same_topic_keeps_the_binding(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic)
    for _ in range(3):
        await transport.declare([topic], [subscription])
    await transport.publish(topic, WireMessage(b"still bound"))
    collector = Collector()
    await transport.subscribe(subscription, collector)
    await collector.wait(1, TIMEOUT)


async def test_changed_delivery_limit_raises_transport_error_naming_the_argument(
    open_rabbit: Open,
) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    first = sub(topic, max_deliveries=10)
    await transport.declare([topic], [first])
    changed = ports.Subscription(name=first.name, topic=topic, max_deliveries=20)
    with pytest.raises(errors.TransportError, match="x-delivery-limit") as raised:
        await transport.declare([topic], [changed])
    assert f"delete_queue conveyor-limited.{first.name}" in str(raised.value)
    await transport.declare([topic], [first])  # the transport is still usable


async def test_invalid_topic_is_refused_before_reaching_the_broker(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    with pytest.raises(errors.ConfigurationError):
        await transport.declare(["orders.#"], [])


# -- unroutable messages --------------------------------------------------------------


async def test_publish_to_a_topic_no_queue_is_bound_to_raises_a_non_transient_error(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    with pytest.raises(errors.TransportError) as raised:
        await transport.publish(unique("rt"), WireMessage(b"unroutable"))
    assert not isinstance(raised.value, errors.TransientTransportError)  # the relay spends an attempt


async def test_relay_does_not_mark_a_message_to_an_unbound_topic_sent(open_rabbit: Open, db: Database) -> None:
    transport = await open_rabbit()
    await relay_helpers.add(db, 1, topic=unique("rt"))
    result = await Relay(SqlOutboxStore(db, listen=False), transport).run_once()
    assert (result.failed, await relay_helpers.unsent(db)) == (1, 1)


async def test_returned_publish_fails_only_itself_when_another_shares_its_message_id(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    bound, unbound, message_id = unique("rt"), unique("rt"), unique("m")
    await transport.declare([bound], [sub(bound)])
    outcomes = await asyncio.gather(
        transport.publish(unbound, WireMessage(b"returned", message_id=message_id)),
        transport.publish(bound, WireMessage(b"routed", message_id=message_id)),
        return_exceptions=True,
    )
    assert [type(outcome).__name__ for outcome in outcomes] == ["TransportError", "NoneType"]


# -- retries and attempts --------------------------------------------------------------


async def test_delay_tier_is_a_quorum_queue_with_at_least_once_dead_lettering(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel, own_tier: float
) -> None:
    transport = await open_rabbit(delay_tiers=(own_tier,))
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])

    async def nack_once(delivery: ports.Delivery) -> None:
        await (delivery.nack(own_tier) if delivery.attempt == 1 else delivery.ack())

    collector = Collector(settle=nack_once)
    await transport.subscribe(subscription, collector)
    await transport.publish(topic, WireMessage(b"through the tier"))
    await collector.wait(2, TIMEOUT)
    name = rabbit_wire.tier_name("conveyor", round(own_tier * 1000))
    await raw_channel.declare_queue(name, passive=True)  # it exists, so the declare below only compares
    expected = {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    arguments = {"x-message-ttl": round(own_tier * 1000), "x-dead-letter-exchange": "", **expected}
    await raw_channel.declare_queue(name, durable=True, arguments=arguments)  # refused if any differs


async def test_nack_after_its_tier_queue_was_deleted_still_redelivers(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel, own_tier: float
) -> None:
    transport = await open_rabbit(delay_tiers=(own_tier,))
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])

    async def nack_once(delivery: ports.Delivery) -> None:
        with contextlib.suppress(errors.TransportError):  # the copy was refused: the original is requeued
            await (delivery.nack(own_tier) if delivery.attempt == 1 else delivery.ack())

    collector = Collector(settle=nack_once)
    await transport.subscribe(subscription, collector)
    await transport.publish(topic, WireMessage(b"declares the tier"))
    await collector.wait(2, TIMEOUT)
    await raw_channel.queue_delete(rabbit_wire.tier_name("conveyor", round(own_tier * 1000)))
    await transport.publish(topic, WireMessage(b"nacked"))
    await wait_for(lambda: collector.bodies().count(b"nacked") == 2, TIMEOUT, "the nacked message again")


async def test_nack_delivers_the_copy_only_to_the_nacking_subscription(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    retrying, other = sub(topic), sub(topic)
    await transport.declare([topic], [retrying, other])

    async def nack_once(delivery: ports.Delivery) -> None:
        await (delivery.nack(0.05) if delivery.attempt == 1 else delivery.ack())

    first, second = Collector(settle=nack_once), Collector()
    await transport.subscribe(retrying, first)
    await transport.subscribe(other, second)
    await transport.publish(topic, WireMessage(b"m"))
    await first.wait(2, TIMEOUT)
    await transport.publish(topic, WireMessage(b"marker"))
    await wait_for(lambda: b"marker" in second.bodies(), TIMEOUT, "the marker")
    assert second.bodies() == [b"m", b"marker"]


async def test_nack_longer_than_the_largest_tier_is_not_delivered_early(open_rabbit: Open) -> None:
    transport = await open_rabbit(delay_tiers=(0.05, 0.1))
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])

    async def nack_once(delivery: ports.Delivery) -> None:
        await (delivery.nack(0.6) if delivery.attempt == 1 else delivery.ack())

    collector = Collector(settle=nack_once)
    await transport.subscribe(subscription, collector)
    await transport.publish(topic, WireMessage(b"later"))
    first, second = await collector.wait(2, TIMEOUT)
    assert second.attempt == 2
    assert second.at - first.at >= 0.55


async def test_redelivery_after_a_consumer_died_counts_as_an_attempt(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    await transport.publish(topic, WireMessage(b"unsettled"))
    first = Collector(settle=keep)
    await transport.subscribe(subscription, first)
    await first.wait(1, TIMEOUT)
    await transport.close()
    second = Collector()
    await (await open_rabbit()).subscribe(subscription, second)
    (again,) = await second.wait(1, TIMEOUT)
    assert (first.received[0].attempt, again.attempt) == (1, 2)


async def test_stop_returns_deliveries_not_yet_handed_out(open_rabbit: Open) -> None:
    first_transport, second_transport = await open_rabbit(), await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic, prefetch=10)
    await first_transport.declare([topic], [subscription])
    for i in range(5):
        await first_transport.publish(topic, WireMessage(str(i).encode()))
    blocked = asyncio.Event()

    async def block_on_second(delivery: ports.Delivery) -> None:
        if delivery.message.body != b"0":
            await blocked.wait()  # back-pressure: the consumer cannot hand out more

    first = Collector(settle=block_on_second)
    consumer = await first_transport.subscribe(subscription, first)
    await first.wait(2, TIMEOUT)
    await consumer.stop()
    second = Collector()
    await second_transport.subscribe(subscription, second)
    await second.wait(4, TIMEOUT)
    assert sorted(second.bodies()) == [b"1", b"2", b"3", b"4"]


async def test_single_consumer_receives_in_publish_order(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    for i in range(50):
        await transport.publish(topic, WireMessage(str(i).encode(), key=f"k{i % 3}"))
    collector = Collector()
    await transport.subscribe(subscription, collector)
    await collector.wait(50, TIMEOUT)
    assert collector.bodies() == [str(i).encode() for i in range(50)]


# -- connection ----------------------------------------------------------------------


async def test_connect_to_a_closed_port_raises_transient_error() -> None:
    transport = RabbitTransport("amqp://guest:guest@127.0.0.1:1/", timeout=2.0)
    with pytest.raises(errors.TransientTransportError):
        await transport.connect()


async def test_check_after_close_raises_transport_error(open_rabbit: Open) -> None:
    transport = await open_rabbit()
    await transport.close()
    with pytest.raises(errors.TransportError):
        await transport.check()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.serial  # stops the shared RabbitMQ: every other test on it would fail meanwhile
async def test_consumer_resumes_after_a_broker_restart_without_losing_messages(
    open_rabbit: Open, rabbit_url: str
) -> None:
    local = urlsplit(rabbit_url).hostname in {"127.0.0.1", "localhost"}
    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0 or not local:
        reason = "restarting the broker needs rabbitmqctl, root and the local RabbitMQ"
        if brokers.in_ci():
            pytest.fail(f"{reason} (in CI this guarantee must be tested)")
        pytest.skip(reason)
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic, prefetch=4)
    await transport.declare([topic], [subscription])
    seen: set[bytes] = set()
    restarted = asyncio.Event()

    async def handle(delivery: ports.Delivery) -> None:
        seen.add(delivery.message.body)
        if len(seen) >= 5:
            await restarted.wait()  # in flight while the broker goes away
        with contextlib.suppress(errors.TransportError):  # the channel died: it comes back
            await delivery.ack()

    consumer = await transport.subscribe(subscription, handle)
    sent = [str(i).encode() for i in range(30)]
    for body in sent[:15]:
        await transport.publish(topic, WireMessage(body))
    await wait_for(lambda: len(seen) >= 5, TIMEOUT, "some deliveries before the restart")
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await wait_for(lambda: not consumer.active, TIMEOUT, "the consumer to notice")
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")
        restarted.set()
    for body in sent[15:]:
        await transport.publish(topic, WireMessage(body))
    await wait_for(lambda: seen == set(sent), TIMEOUT, "every message after the restart")
    assert consumer.active


# -- CloudEvents interoperability ---------------------------------------------------------

ATTRIBUTES = {
    "specversion": "1.0",
    "id": "e-1",
    "source": "/other-service",
    "type": "orders.placed",
}


@pytest.mark.parametrize("prefix", ["cloudEvents_", "cloudEvents:", "ce-", "ce_"])
async def test_binary_event_from_a_plain_client_decodes(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel, prefix: str
) -> None:
    headers = {prefix + name: value for name, value in ATTRIBUTES.items()}
    message = aio_pika.Message(b'{"order_id": "o-1"}', headers=headers, content_type="application/json")
    event = await receive_from_plain_client(open_rabbit, raw_channel, message)
    assert (event.id, event.source, event.type, event.json()) == (
        "e-1",
        "/other-service",
        "orders.placed",
        {"order_id": "o-1"},
    )


async def test_structured_event_from_a_plain_client_decodes(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    body = orjson.dumps({**ATTRIBUTES, "datacontenttype": "application/json", "data": {"order_id": "o-1"}})
    message = aio_pika.Message(body, content_type=envelope.STRUCTURED)
    event = await receive_from_plain_client(open_rabbit, raw_channel, message)
    assert (event.id, event.json()) == ("e-1", {"order_id": "o-1"})


async def test_event_from_the_cloudevents_sdk_rabbitmq_binding_decodes(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    sdk_event = CloudEvent(
        attributes={
            **ATTRIBUTES,
            "time": datetime(2024, 5, 1, tzinfo=UTC),
            "datacontenttype": "application/json",
        },
        data={"order_id": "o-1"},
    )
    sdk_message = ce_rabbitmq.to_binary(sdk_event, JSONFormat())
    content_type = sdk_message.content_type
    message = aio_pika.Message(sdk_message.body, headers=sdk_message.headers, content_type=content_type)
    event = await receive_from_plain_client(open_rabbit, raw_channel, message)
    assert (event.id, event.time, event.json()) == (
        "e-1",
        datetime(2024, 5, 1, tzinfo=UTC),
        {"order_id": "o-1"},
    )


async def test_our_event_decodes_with_the_cloudevents_sdk_amqp_binding(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    queue = await raw_channel.declare_queue(exclusive=True)
    await queue.bind("conveyor", routing_key=topic)
    sent = envelope.create("orders.placed", {"order_id": "o-1"}, source="shop", key="o-1")
    await transport.publish(topic, envelope.to_binary(sent, transport.binary_prefix))
    received = await queue.get(timeout=TIMEOUT)
    await received.ack()
    amqp_message = ce_amqp.AMQPMessage(
        properties={"content-type": received.content_type},
        application_properties=dict(received.headers),
        application_data=received.body,
    )
    event = ce_amqp.from_binary(amqp_message, JSONFormat())
    assert (event.get_id(), event.get_source(), event.get_type()) == (
        sent.id,
        "shop",
        "orders.placed",
    )
    assert (event.get_time(), event.get_data(), event.get_extension("partitionkey")) == (
        sent.time, {"order_id": "o-1"}, "o-1",
    )  # fmt: skip
    assert received.message_id == sent.id


async def test_header_values_of_other_types_arrive_as_text(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    headers = {
        "x-bytes": bytearray(b"raw"),
        "x-int": 7,
        "x-bool": True,
        "x-time": datetime(2024, 5, 1),
    }
    underlay = await raw_channel.get_underlay_channel()  # pamqp types, as other clients send them
    properties = Basic.Properties(headers=headers)
    await underlay.basic_publish(b"{}", exchange="conveyor", routing_key=topic, properties=properties)
    collector = Collector()
    await transport.subscribe(subscription, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    assert all(isinstance(v, str) for v in got.message.headers.values())
    assert (got.message.headers["x-bytes"], got.message.headers["x-int"]) == ("raw", "7")


async def test_declare_only_provisions_schedule_job_queues_too(rabbit_url: str) -> None:
    from datetime import timedelta

    from conveyor import Context, Registry, every
    from conveyor.runtime import app
    from conveyor.settings import Settings

    @every(timedelta(hours=1), name=unique("declared"))
    async def job(ctx: Context) -> None: ...

    schedule = job.__conveyor_schedule__  # type: ignore[attr-defined]
    await app.declare(Settings(broker_url=rabbit_url), Registry.of(job))
    connection = await aio_pika.connect(rabbit_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"conveyor-limited.{schedule.topic}", passive=True)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


@pytest.mark.parametrize("prefix", ["cloudEvents_", "cloudEvents:", "ce-", "ce_"])
async def test_partitionkey_of_a_plain_clients_event_is_the_delivery_key(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel, prefix: str
) -> None:
    transport, topic = await open_rabbit(), unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    headers = {prefix + name: value for name, value in {**ATTRIBUTES, "partitionkey": "order-7"}.items()}
    await publish_raw(raw_channel, topic, aio_pika.Message(b"{}", headers=headers, content_type="application/json"))
    collector = Collector()
    await transport.subscribe(subscription, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    assert got.message.key == "order-7"


# -- frames the AMQP client cannot decode ------------------------------------------------


async def test_header_name_that_is_not_utf8_reaches_the_consumer_marked_unreadable(
    open_rabbit: Open, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    connection = await transport.wait_connected()
    body = b'{"order_id": "o-1"}\x00\xff'
    await publish_undecodable(raw_channel, topic, body)
    await transport.publish(topic, WireMessage(b"after", message_id=unique("id")))
    collector = Collector()
    await transport.subscribe(subscription, collector)
    bad, good = await collector.wait(2, TIMEOUT)
    assert bad.message.body == body
    assert bad.message.unreadable is not None and "bad-" in bad.message.unreadable, bad.message.unreadable
    assert bad.message.headers["bad-\ufffd\ufffd-name"] == "v"
    assert bad.message.headers["cloudEvents_id"] == "e-1"
    assert (good.message.body, good.message.unreadable) == (b"after", None)
    assert await transport.wait_connected() is connection  # the connection never dropped


# -- the broker's delivery limit dead-letters ---------------------------------------------


async def over_the_limit(rabbit_url: str, queue: str, limit: int) -> None:
    """Deliver the queue's one message and give it back more often than ``limit``, with a raw client."""
    async with await aio_pika.connect(rabbit_url) as connection:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        for _ in range(limit + 1):
            got = await raw.basic_get(queue, no_ack=False, timeout=TIMEOUT)
            assert isinstance(got.delivery, Basic.GetOk), f"the message left {queue} before its limit"
            await raw.basic_reject(got.delivery_tag or 0, requeue=True)


async def dead_letters_of(transport: RabbitTransport, topic: str, count: int) -> list[WireMessage]:
    keeper = ports.Subscription(name=f"{topic}.dlq", topic=f"{topic}.dlq", max_deliveries=None)
    collector = Collector()
    consumer = await transport.subscribe(keeper, collector)
    try:
        return [r.message for r in await collector.wait(count, TIMEOUT)]
    finally:
        await consumer.stop()


async def test_message_over_the_delivery_limit_is_dead_lettered_not_dropped(open_rabbit: Open, rabbit_url: str) -> None:
    transport = await open_rabbit()
    topic = unique("rt")
    subscription = sub(topic, max_deliveries=2)
    await transport.declare([topic], [subscription])
    body = b"\x00poison\xff"
    await transport.publish(topic, WireMessage(body, {"x-kind": "over-limit"}, message_id=unique("id")))
    await over_the_limit(rabbit_url, transport.queue_name(subscription), 2)
    (letter,) = await dead_letters_of(transport, topic, 1)
    assert (letter.body, letter.headers["x-kind"]) == (body, "over-limit")
    assert letter.headers["conveyor-dlq-error-type"] == "DeliveryLimit"
    assert transport.queue_name(subscription) in letter.headers["conveyor-dlq-error"]
    assert letter.headers["conveyor-dlq-handler"] == subscription.name


async def test_queue_of_an_earlier_version_without_a_dead_letter_target_is_replaced_its_messages_kept(
    open_rabbit: Open, rabbit_url: str
) -> None:
    topic = unique("rt")
    subscription = sub(topic, max_deliveries=2)
    old = f"conveyor.{subscription.name}"
    async with await aio_pika.connect(rabbit_url) as connection:  # the queue as earlier versions declared it
        channel = await connection.channel()
        exchange = await channel.declare_exchange("conveyor", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            old, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 2}
        )
        await queue.bind(exchange, routing_key=topic)
        await exchange.publish(aio_pika.Message(b"waiting", headers={"x-kind": "old"}), routing_key=topic)
    transport = await open_rabbit()
    try:
        await transport.declare([topic], [subscription])
        await over_the_limit(rabbit_url, transport.queue_name(subscription), 2)
        (letter,) = await dead_letters_of(transport, topic, 1)
        assert (letter.body, letter.headers["x-kind"]) == (b"waiting", "old")
        async with await aio_pika.connect(rabbit_url) as connection:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(old, passive=True)
    finally:
        await brokers.delete_rabbit_queues(rabbit_url, [old])


async def test_subscription_moved_to_another_topic_dead_letters_over_the_limit_to_the_new_topic(
    open_rabbit: Open, rabbit_url: str
) -> None:
    transport = await open_rabbit()
    old, new = unique("rt"), unique("rt")
    before = sub(old, max_deliveries=2)
    await transport.declare([old], [before])
    moved = ports.Subscription(name=before.name, topic=new, max_deliveries=2)
    await transport.declare([new], [moved])
    await transport.publish(new, WireMessage(b"moved", message_id=unique("id")))
    await over_the_limit(rabbit_url, transport.queue_name(moved), 2)
    (letter,) = await dead_letters_of(transport, new, 1)
    assert letter.body == b"moved"
    async with await aio_pika.connect(rabbit_url) as connection:
        channel = await connection.channel()
        old_keeper = await channel.declare_queue(f"conveyor-kept.{old}.dlq", passive=True)
        assert old_keeper.declaration_result.message_count == 0
    await brokers.delete_rabbit_queues(rabbit_url, [f"conveyor-kept.{old}.dlq", f"conveyor-kept.{new}.dlq"])
