"""A dead letter the broker refuses for good is kept in the database, never looped or dropped."""

from __future__ import annotations

from conveyor import Reject, envelope, errors, on, ports, registry
from conveyor.runtime import app, dead_letters
from conveyor.runtime.worker import Worker
from conveyor.testing import Collector, unique, wait_for
from conveyor.transports.memory import MemoryConsumer, MemoryTransport

from event_store import Database


class RefusesDeadLetters(MemoryTransport):
    """A broker that refuses (for good, not transiently) every message to a ``.dlq`` topic."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.refused = 0
        self.settled: list[str] = []  # "ack" or "nack", per delivery of a subscription

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        if topic.endswith(".dlq"):
            self.refused += 1
            raise errors.TransportError(f"{topic}: message refused (test)")
        await super().publish(topic, message)

    async def subscribe(self, subscription: ports.Subscription, callback: ports.DeliveryCallback) -> MemoryConsumer:
        async def recording(delivery: ports.Delivery) -> None:
            await callback(_Recorded(delivery, self.settled))

        return await super().subscribe(subscription, recording)


class _Recorded:
    """A delivery that notes how it was settled."""

    def __init__(self, delivery: ports.Delivery, settled: list[str]) -> None:
        self._delivery, self._settled = delivery, settled
        self.topic, self.message, self.attempt = delivery.topic, delivery.message, delivery.attempt

    async def ack(self) -> None:
        await self._delivery.ack()
        self._settled.append("ack")

    async def nack(self, delay: float) -> None:
        await self._delivery.nack(delay)
        self._settled.append("nack")


async def test_a_refused_dead_letter_is_kept_in_the_database_and_acknowledged(db: Database) -> None:
    topic = unique("dl")
    runs: list[int] = []

    @on(topic, name=unique("dl"))
    async def refuses(payload: dict) -> None:
        runs.append(1)
        raise Reject("not wanted")

    transport = RefusesDeadLetters(f"memory://{unique('dl')}")
    await transport.connect()
    stores = app.stores_for(db, "t")
    worker = Worker(registry.Registry.of(refuses).handlers, transport, source="t", transactions=stores.units,
                    dead_letters=stores.dead_letters)  # fmt: skip
    await worker.start()
    event = envelope.create(topic, {"n": 1}, source="t")
    await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))
    await wait_for(lambda: transport.refused >= 1, 10, "the refused dead letter")
    await wait_for(lambda: bool(transport.settled), 10, "the message to be settled")
    assert transport.settled == ["ack"]  # a nack would start a redelivery loop
    assert await worker.stop(5)
    await transport.close()
    kept = await stores.dead_letters.held(f"{topic}.dlq")
    reasons = [k.message.headers["conveyor-dlq-error-type"] for k in kept]
    assert (len(runs), [envelope.decode(k.message).id for k in kept], reasons) == (1, [event.id], ["Rejected"])


async def test_held_dead_letters_are_listed_and_replayed_with_the_brokers(db: Database) -> None:
    topic = unique("dl")
    stores = app.stores_for(db, "t")
    event = envelope.create(topic, {"n": 1}, source="t")
    letter = envelope.to_binary(event, "ce-")
    letter.headers.update({"conveyor-dlq-error-type": "Rejected", "conveyor-dlq-topic": topic})
    await stores.dead_letters.hold(f"{topic}.dlq", letter)
    transport = MemoryTransport(f"memory://{unique('dl')}")
    await transport.connect()
    back = Collector()
    await transport.subscribe(ports.Subscription(name=unique("back"), topic=topic), back)
    listed = await dead_letters.peek(transport, topic, idle=0.2, held=stores.dead_letters)
    replayed = await dead_letters.replay(transport, topic, idle=0.2, held=stores.dead_letters)
    (got,) = await back.wait(1)
    await transport.close()
    assert ([d.event_id for d in listed], len(replayed), envelope.decode(got.message).id) == ([event.id], 1, event.id)
    assert await stores.dead_letters.held(f"{topic}.dlq") == []
