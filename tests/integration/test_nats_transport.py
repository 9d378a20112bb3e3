"""NATS JetStream transport: topology, dedup, reconnects and CloudEvents interop with other clients.

Every test uses its own topics and durables in the shared ``CONVEYOR`` stream;
the restart test restarts the local nats-server (same store directory) and
always leaves it running.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import nats
import orjson
import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent
from conveyor import Context, Reject, envelope, errors, on, ports, registry
from conveyor.envelope import WireMessage
from conveyor.runtime.worker import Worker
from conveyor.testing import Collector, remains, unique, wait_for
from conveyor.transports.nats import NatsTransport
from conveyor.transports.nats_wire import durable_name
from dlq_helpers import peek_until
from nats.js import JetStreamContext

TIMEOUT = 20.0
OpenTransport = Callable[..., Awaitable[NatsTransport]]


@pytest.fixture
async def open_transport(nats_url: str) -> AsyncIterator[OpenTransport]:
    """Connected transports on the session's server, closed at teardown."""
    opened: list[NatsTransport] = []

    async def open_one(**options: object) -> NatsTransport:
        transport = NatsTransport(nats_url, inactive_threshold=3600.0, **options)  # type: ignore[arg-type]
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in reversed(opened):
        await transport.close()


@pytest.fixture
async def raw_js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    """A plain nats-py JetStream client: another service, not Conveyor."""
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


def sub(topic: str, name: str | None = None, **options: float) -> ports.Subscription:
    return ports.Subscription(name=name or unique("sub"), topic=topic, **options)  # type: ignore[arg-type]


# -- names and topology ---------------------------------------------------------


def test_durable_name_of_dotted_name_is_readable() -> None:
    assert durable_name("billing.charge-order") == "billing_charge-order"


def test_durable_name_of_names_that_map_alike_differ() -> None:
    assert len({durable_name(n) for n in ("a.b", "a_b", "a_.b", "a._b")}) == 4


def test_durable_name_of_invalid_name_raises_configuration_error() -> None:
    with pytest.raises(errors.ConfigurationError):
        durable_name("orders.*")


async def test_moved_subscription_follows_its_new_topic(open_transport: OpenTransport) -> None:
    transport = await open_transport()
    old, new, name = unique("nt"), unique("nt"), unique("sub")
    await transport.declare([old], [sub(old, name)])
    await transport.declare([new], [sub(new, name)])
    await transport.publish(old, WireMessage(b"old topic"))
    await transport.publish(new, WireMessage(b"new topic"))
    await transport.publish(new, WireMessage(b"marker"))
    collector = Collector()
    await transport.subscribe(sub(new, name), collector)
    # The durable hands out in stream order: "old topic" (a stale filter) would come before the marker.
    await wait_for(lambda: b"marker" in collector.bodies(), TIMEOUT, "the marker")
    assert collector.bodies() == [b"new topic", b"marker"]


async def test_declare_updates_changed_ack_wait_in_place(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    transport = await open_transport()
    topic, name = unique("nt"), unique("sub")
    await transport.declare([topic], [sub(topic, name, ack_wait=30.0)])
    await transport.declare([topic], [sub(topic, name, ack_wait=45.0)])
    info = await raw_js.consumer_info(transport.stream, durable_name(name))
    assert info.config.ack_wait == 45.0


# -- publishing -----------------------------------------------------------------


async def test_publish_same_message_id_twice_is_delivered_once(open_transport: OpenTransport) -> None:
    transport = await open_transport()
    topic = unique("nt")
    subscription = sub(topic)
    await transport.declare([topic], [subscription])
    same = unique("id")
    await transport.publish(topic, WireMessage(b"first", message_id=same))
    await transport.publish(topic, WireMessage(b"second", message_id=same))
    await transport.publish(topic, WireMessage(b"marker"))
    collector = Collector()
    await transport.subscribe(subscription, collector)
    await wait_for(lambda: b"marker" in collector.bodies(), TIMEOUT, "the marker")
    assert collector.bodies() == [b"first", b"marker"]


async def test_publish_without_a_stream_raises_transient_error(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    stream = unique("ST").replace(".", "_").upper()
    transport = await open_transport(stream=stream, subject_prefix=stream.lower())
    await raw_js.delete_stream(stream)  # created by this test's transport
    with pytest.raises(errors.TransientTransportError):
        await transport.publish(unique("nt"), WireMessage(b"nowhere"))


async def test_connect_to_a_closed_port_raises_transient_error() -> None:
    transport = NatsTransport("nats://127.0.0.1:1", connect_timeout=1.0)
    with pytest.raises(errors.TransientTransportError):
        await transport.connect()


async def test_check_after_close_raises_transport_error(open_transport: OpenTransport) -> None:
    transport = await open_transport()
    await transport.close()
    with pytest.raises(errors.TransportError):
        await transport.check()


# -- consuming ------------------------------------------------------------------


async def test_attempt_count_survives_a_new_connection(open_transport: OpenTransport) -> None:
    first = await open_transport()
    topic = unique("nt")
    subscription = sub(topic)
    await first.declare([topic], [subscription])
    await first.publish(topic, WireMessage(b"again"))

    async def nack_twice_then_keep(delivery: ports.Delivery) -> None:
        if delivery.attempt < 3:
            await delivery.nack(0.0)

    failing = Collector(settle=nack_twice_then_keep)
    await first.subscribe(subscription, failing)
    await failing.wait(3, TIMEOUT)
    await first.close()  # gives the third delivery back unsettled
    collector = Collector()
    await (await open_transport()).subscribe(subscription, collector)
    (got,) = await collector.wait(1, TIMEOUT)
    assert (got.message.body, got.attempt) == (b"again", 4)


async def test_stopped_consumer_is_not_active(open_transport: OpenTransport) -> None:
    transport = await open_transport()
    topic = unique("nt")
    consumer = await transport.subscribe(sub(topic), Collector())
    await wait_for(lambda: consumer.active, TIMEOUT, "the consumer to become active")
    await consumer.stop()
    assert not consumer.active


async def test_deleted_durable_is_recreated_and_consumption_resumes(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    transport = await open_transport()
    topic = unique("nt")
    subscription = sub(topic)
    collector = Collector()
    await transport.subscribe(subscription, collector)
    await transport.publish(topic, WireMessage(b"first"))
    await collector.wait(1, TIMEOUT)
    await raw_js.delete_consumer(transport.stream, durable_name(subscription.name))  # this test's own
    await transport.publish(topic, WireMessage(b"second"))
    await wait_for(lambda: b"second" in collector.bodies(), TIMEOUT, "the message after the deletion")


async def _publish_retrying(transport: NatsTransport, topic: str, message: WireMessage) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            await transport.publish(topic, message)
            return
        except errors.TransientTransportError:
            assert time.monotonic() < deadline, "publish kept failing after the restart"
            await asyncio.sleep(0.1)


async def test_consumer_resumes_after_server_restart_without_loss(
    open_transport: OpenTransport, nats_url: str, request: pytest.FixtureRequest
) -> None:
    """The session's nats-server is killed (SIGKILL: pull requests die unanswered) and started again."""
    if os.environ.get("CONVEYOR_TEST_NATS_URL"):
        pytest.skip("restarts only the session's own nats-server")  # environment, never in CI
    server = request.getfixturevalue("nats_server")
    transport = await open_transport()
    topic = unique("nt")
    subscription = sub(topic, prefetch=40, ack_wait=3.0)
    await transport.declare([topic], [subscription])
    held: list[ports.Delivery] = []

    async def hold_three(delivery: ports.Delivery) -> None:
        # Three stay unsettled until the end, so the consumer cannot count on
        # credit they free; the rest leave it idle with pull requests
        # outstanding, which the restart kills without an answer.
        if len(held) < 3:
            held.append(delivery)
        else:
            await delivery.ack()

    collector = Collector(settle=hold_three)
    await transport.subscribe(subscription, collector)
    before = [f"before-{i}".encode() for i in range(20)]
    for body in before:
        await transport.publish(topic, WireMessage(body))
    await collector.wait(len(before), TIMEOUT)
    await asyncio.to_thread(server.restart)
    after = [f"after-{i}".encode() for i in range(20)]
    for body in after:
        await _publish_retrying(transport, topic, WireMessage(body))
    expected = set(before + after)
    await wait_for(lambda: expected <= set(collector.bodies()), TIMEOUT, "every message after the restart")
    for delivery in held:
        await delivery.ack()


# -- CloudEvents interop --------------------------------------------------------


def _sdk_event() -> CloudEvent:
    return CloudEvent(
        attributes={
            "id": envelope.new_id(), "source": "/other-service", "type": "orders.placed",
            "specversion": "1.0", "datacontenttype": "application/json", "time": datetime.now(UTC),
            "subject": "orders/o-1", "partitionkey": "o-1",
        },
        data={"order_id": "o-1", "total_cents": 250},
    )  # fmt: skip


async def _consume_one(transport: NatsTransport, topic: str) -> WireMessage:
    collector = Collector()
    await transport.subscribe(sub(topic), collector)
    (got,) = await collector.wait(1, TIMEOUT)
    return got.message


async def _decoded_from(
    transport: NatsTransport, raw_js: JetStreamContext, body: bytes, headers: dict[str, str] | None
) -> envelope.Envelope:
    topic = unique("nt")
    await raw_js.publish(transport.subject(topic), body, headers=headers)
    return envelope.decode(await _consume_one(transport, topic))


def _summary(event: BaseCloudEvent | envelope.Envelope) -> tuple[object, ...]:
    if isinstance(event, envelope.Envelope):
        return event.id, event.source, event.type, event.subject, event.key, orjson.loads(event.data)
    return (
        event.get_id(), event.get_source(), event.get_type(), event.get_subject(),
        event.get_extension("partitionkey"), event.get_data(),
    )  # fmt: skip


async def test_sdk_binary_mode_message_from_a_plain_client_decodes(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    event = _sdk_event()
    message = ce_http.to_binary_event(event)
    decoded = await _decoded_from(await open_transport(), raw_js, message.body, message.headers)
    assert _summary(decoded) == _summary(event)


async def test_sdk_structured_mode_message_from_a_plain_client_decodes(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    event = _sdk_event()
    message = ce_http.to_structured_event(event)
    assert message.headers["content-type"].startswith(envelope.STRUCTURED)
    decoded = await _decoded_from(await open_transport(), raw_js, message.body, message.headers)
    assert _summary(decoded) == _summary(event)


async def test_structured_message_without_headers_decodes(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    event = _sdk_event()
    body = ce_http.to_structured_event(event).body
    decoded = await _decoded_from(await open_transport(), raw_js, body, None)
    assert _summary(decoded) == _summary(event)


async def test_published_envelope_decodes_with_the_cloudevents_sdk(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    transport = await open_transport()
    topic = unique("nt")
    sent = envelope.create("orders.placed", {"order_id": "o-1", "total_cents": 250}, source="shop", key="o-1")
    await transport.publish(topic, envelope.to_binary(sent, transport.binary_prefix))
    stored = await raw_js.get_last_msg(transport.stream, transport.subject(topic))
    assert stored.headers is not None and stored.data is not None
    event = ce_http.from_http_event(ce_http.HTTPMessage(headers=dict(stored.headers), body=stored.data))
    assert _summary(event) == _summary(sent)
    assert (event.get_time(), stored.headers["Nats-Msg-Id"]) == (sent.time, sent.id)


async def test_message_from_a_plain_client_has_no_key_and_its_stream_position_as_id(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    transport = await open_transport()
    topic = unique("nt")
    ack = await raw_js.publish(transport.subject(topic), b"plain")
    got = await _consume_one(transport, topic)
    assert (got.body, got.key, got.message_id) == (b"plain", None, f"{transport.stream}/{ack.seq}")


async def test_dead_letter_copy_of_a_message_with_jetstream_control_headers_is_stored(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    transport = await open_transport()
    topic = unique("ctl")
    rejected: list[str] = []

    @on(topic, name=unique("ctl"))
    async def refuse(payload: dict, ctx: Context) -> None:
        rejected.append(ctx.message.id)
        raise Reject("not wanted")

    worker = Worker(registry.Registry.of(refuse).handlers, transport, source="t")
    await worker.declare()
    # Valid when published (the stream is at that sequence), refused on any later copy.
    last = (await raw_js.stream_info(transport.stream)).state.last_seq
    event = envelope.to_binary(envelope.create(topic, {"n": 1}, source="raw"), envelope.NATS_PREFIX)
    control = {"Nats-Expected-Last-Sequence": str(last), "Nats-Expected-Stream": transport.stream}
    await raw_js.publish(transport.subject(topic), event.body, headers={**event.headers, **control})
    await worker.start()
    await wait_for(lambda: bool(rejected), TIMEOUT, "the message to be handled")
    listed = await peek_until(open_transport, topic)
    assert await worker.stop(5)
    assert [d.event_id for d in listed] == rejected[:1]


async def test_a_delivery_held_longer_than_ack_wait_is_not_redelivered(open_transport: OpenTransport) -> None:
    transport = await open_transport()
    topic = unique("held")
    held = Collector(settle=lambda delivery: asyncio.sleep(0))  # keeps every delivery unsettled
    subscription = sub(topic, ack_wait=1.0)
    await transport.declare([topic], [subscription])
    await transport.subscribe(subscription, held)
    await transport.publish(topic, WireMessage(b"slow", message_id=unique("m")))
    (first,) = await held.wait(1, TIMEOUT)
    # A sleep, as the length is the point: held (queued or running) for three ack waits.
    await remains(lambda: len(held.received) == 1, 3.5, "no redelivery while the first is held")
    await first.delivery.ack()
    assert [r.attempt for r in held.received] == [1]


async def test_partitionkey_of_a_plain_clients_event_is_the_delivery_key(
    open_transport: OpenTransport, raw_js: JetStreamContext
) -> None:
    transport, topic = await open_transport(), unique("nt")
    wire = envelope.to_binary(envelope.create(topic, {}, source="raw", key="order-7"), envelope.NATS_PREFIX)
    await raw_js.publish(transport.subject(topic), wire.body, headers=wire.headers)  # no conveyor-key header
    assert (await _consume_one(transport, topic)).key == "order-7"
