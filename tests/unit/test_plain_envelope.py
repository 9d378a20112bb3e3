"""Plain (non-CloudEvents) messages: accepted by ``plain=True`` handlers, dead-lettered by the others."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import pydantic
import pytest
from conveyor import Context, envelope, on, plain, registry, settings
from conveyor.runtime import dead_letters
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports import kafka_delivery, nats_consume
from conveyor.transports.memory import MemoryTransport

BODY = b'{"order_id": "o-1"}'


class Order(pydantic.BaseModel):
    order_id: str


def plain_message(message_id: str | None = "m-1", body: bytes = BODY) -> envelope.WireMessage:
    return envelope.WireMessage(body, {"content-type": "application/json", "x-app": "node"}, "k-1", message_id)


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    opened = MemoryTransport(f"memory://{unique('plain')}")
    await opened.connect()
    yield opened
    await opened.close()


async def run_one(
    transport: MemoryTransport, handler: object, message: envelope.WireMessage, **options: bool
) -> list[dead_letters.DeadLetter]:
    """Start a worker for ``handler``, publish ``message`` to its topic; return the dead letters."""
    worker = Worker(registry.Registry.of(handler).handlers, transport, source="t", **options)  # type: ignore[arg-type]
    await worker.start()
    topic = worker.subscriptions()[0].topic
    await transport.publish(topic, message)
    letters = await dead_letters.peek(transport, topic, idle=0.3)
    assert await worker.stop(5)
    return letters


async def test_plain_body_to_a_plain_handler_is_handled_in_a_synthesised_envelope(transport: MemoryTransport) -> None:
    topic, seen = unique("plain"), []

    @on(topic, name=unique("plain"), plain=True)
    async def handle(order: Order, ctx: Context) -> None:
        seen.append((order.order_id, ctx.message))

    await run_one(transport, handle, plain_message())
    [(order_id, message)] = seen
    assert (order_id, message.id, message.type, message.source) == ("o-1", "m-1", topic, "conveyor:plain:memory")
    assert (message.datacontenttype, message.key, message.headers) == ("application/json", "k-1", {"x-app": "node"})


async def test_plain_body_to_a_handler_without_plain_is_dead_lettered(transport: MemoryTransport) -> None:
    handled: list[dict] = []

    @on(unique("plain"), name=unique("plain"))
    async def strict(payload: dict) -> None:
        handled.append(payload)

    dead = await run_one(transport, strict, plain_message())
    assert handled == [] and [(d.error_type, d.error[:16]) for d in dead] == [("InvalidMessage", "not a CloudEvent")]


async def test_plain_messages_setting_makes_every_handler_accept_plain_bodies(transport: MemoryTransport) -> None:
    handled: list[dict] = []

    @on(unique("plain"), name=unique("plain"))
    async def lenient(payload: dict) -> None:
        handled.append(payload)

    await run_one(transport, lenient, plain_message(), plain_messages=True)
    assert handled == [{"order_id": "o-1"}]


async def test_invalid_cloudevent_to_a_plain_handler_is_still_dead_lettered(transport: MemoryTransport) -> None:
    handled: list[dict] = []

    @on(unique("plain"), name=unique("plain"), plain=True)
    async def handle(payload: dict) -> None:
        handled.append(payload)

    message = envelope.WireMessage(BODY, {"ce-id": "e-1", "ce-specversion": "1.0", "ce-type": "t"}, None, "m-1")
    dead = await run_one(transport, handle, message)
    assert handled == [] and [(d.error_type, "source" in d.error) for d in dead] == [("InvalidMessage", True)]


async def test_plain_body_failing_the_payload_annotation_is_dead_lettered(transport: MemoryTransport) -> None:
    handled: list[Order] = []

    @on(unique("plain"), name=unique("plain"), plain=True)
    async def handle(order: Order) -> None:
        handled.append(order)

    dead = await run_one(transport, handle, plain_message(body=b'{"total": 3}'))
    assert handled == [] and [d.error_type for d in dead] == ["InvalidMessage"]


async def test_cloudevent_to_a_plain_handler_keeps_its_attributes(transport: MemoryTransport) -> None:
    topic, seen = unique("plain"), []

    @on(topic, name=unique("plain"), plain=True)
    async def handle(payload: dict, ctx: Context) -> None:
        seen.append(ctx.message)

    event = envelope.create("orders.placed", {"order_id": "o-1"}, source="shop")
    await run_one(transport, handle, envelope.to_binary(event, transport.binary_prefix))
    await wait_for(lambda: len(seen) == 1, 5, "the event")
    assert (seen[0].id, seen[0].source, seen[0].type) == (event.id, "shop", "orders.placed")


def test_synthesised_id_is_the_broker_id_or_a_stable_digest_of_a_long_one() -> None:
    long_id = "x" * 200
    first = plain.synthesise(plain_message(long_id), "t", "nats").id
    assert first == plain.synthesise(plain_message(long_id), "t", "nats").id
    assert first.startswith("sha256:") and len(first) <= 128


def test_message_without_a_broker_id_gets_a_fresh_id_each_time() -> None:
    ids = {plain.synthesise(plain_message(None), "t", "rabbitmq").id for _ in range(2)}
    assert len(ids) == 2


def test_content_type_defaults_to_json() -> None:
    message = envelope.WireMessage(BODY, {}, None, "m-1")
    assert plain.synthesise(message, "t", "kafka").datacontenttype == "application/json"


@pytest.mark.parametrize(
    "message",
    [
        envelope.WireMessage(BODY, {"ce_id": "1"}),
        envelope.WireMessage(BODY, {"cloudEvents:id": "1"}),
        envelope.WireMessage(BODY, {"content-type": "application/cloudevents+json"}),
        envelope.WireMessage(b'{"specversion": "1.0"}', {}),
    ],
)
def test_anything_that_claims_to_be_a_cloudevent_is_one(message: envelope.WireMessage) -> None:
    assert plain.is_cloudevent(message)


def test_plain_messages_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PLAIN_MESSAGES", "true")
    assert settings.load().plain_messages is True


def test_on_plain_marks_the_handler() -> None:
    @on("orders.placed", name="t.plain", plain=True)
    async def handle(payload: dict) -> None: ...

    assert registry.Registry.of(handle).handlers[0].plain is True


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.CONVEYOR.billing.3.42.7.1700000000000000000.0",
        "$JS.ACK.hub.ACCOUNTHASH.CONVEYOR.billing.3.42.7.1700000000000000000.0.token",
    ],
)
def test_nats_broker_id_without_msg_id_is_the_stream_sequence(reply: str) -> None:
    assert nats_consume.stream_id(reply) == "CONVEYOR/42"


def test_kafka_broker_id_without_our_header_is_the_record_position() -> None:
    record = SimpleNamespace(topic="orders", partition=2, offset=17, key=None, value=BODY, headers=[])
    message, _, _ = kafka_delivery.from_record(record, trusted=False)
    assert message.message_id == "orders/2/17"


@pytest.mark.parametrize("content_type", ["text/plain", "application/msgpack"])
def test_cloudevent_looking_body_labelled_another_media_type_is_plain(content_type: str) -> None:
    message = envelope.WireMessage(b'{"specversion": "1.0", "id": "e-1"}', {"content-type": content_type}, None, "m-1")
    assert not plain.is_cloudevent(message)
    assert plain.read(message, "t", "kafka").data == message.body
