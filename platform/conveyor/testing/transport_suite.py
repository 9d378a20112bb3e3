"""The Transport conformance suite: one set of tests every transport must pass.

A transport proves itself by subclassing :class:`TransportConformance` in a
test module and providing the ``make_transport`` fixture::

    class TestNatsTransport(TransportConformance):
        @pytest.fixture
        def make_transport(self):
            return lambda: NatsTransport("nats://127.0.0.1:4222")

Where brokers honestly differ the tests read ``transport.features`` rather
than the broker's name. Every test uses its own topic and subscription names.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from conveyor import envelope, errors, ports
from conveyor.envelope import WireMessage
from conveyor.testing.support import Collector, remains, unique, wait_for

OpenTransport = Callable[[], Awaitable[ports.Transport]]


def _sub(topic: str, name: str | None = None, prefetch: int = 32) -> ports.Subscription:
    return ports.Subscription(name=name or unique("sub"), topic=topic, prefetch=prefetch, ack_wait=30.0)


class TransportFixtures:
    """Fixtures shared by the conformance suites: a transport factory and cleanup."""

    #: seconds a test waits for deliveries; raise it for slow brokers.
    timeout: float = 20.0

    @pytest.fixture
    def make_transport(self) -> Callable[[], ports.Transport]:
        """Return a factory of new, unconnected transports (override in the subclass)."""
        raise NotImplementedError("subclasses provide the make_transport fixture")

    @pytest.fixture
    async def open_transport(self, make_transport: Callable[[], ports.Transport]) -> AsyncIterator[OpenTransport]:
        """Connect transports on demand; close them all at teardown."""
        opened: list[ports.Transport] = []

        async def open_one() -> ports.Transport:
            transport = make_transport()
            await transport.connect()
            opened.append(transport)
            return transport

        yield open_one
        for transport in reversed(opened):
            await transport.close()

    async def wait_consuming(self, *consumers: ports.Consumer) -> None:
        """Wait until consumers receive (for Kafka: partitions assigned)."""
        await wait_for(lambda: all(c.active for c in consumers), self.timeout, "consumers to become active")


class TransportConformance(TransportFixtures):
    """Behaviour every :class:`~conveyor.ports.Transport` implementation must show."""

    async def publish_all(self, transport: ports.Transport, topic: str, messages: list[WireMessage]) -> None:
        for message in messages:
            await transport.publish(topic, message)

    # -- delivery ----------------------------------------------------------------

    async def test_declared_subscription_receives_body_headers_and_key(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"hello", {"x-trace": "abc"}, key="k1", message_id=unique("m")))
        collector = Collector()
        await transport.subscribe(sub, collector)
        (got,) = await collector.wait(1, self.timeout)
        assert (got.message.body, got.message.headers.get("x-trace"), got.message.key, got.attempt) == (
            b"hello",
            "abc",
            "k1",
            1,
        )

    async def test_binary_body_round_trips_byte_for_byte(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        body = bytes(range(256)) * 1024  # 256 KiB, not UTF-8
        await transport.publish(topic, WireMessage(body))
        collector = Collector()
        await transport.subscribe(sub, collector)
        (got,) = await collector.wait(1, self.timeout)
        assert got.message.body == body

    async def test_envelope_survives_the_binary_binding(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        sent = envelope.create(
            "orders.placed",
            {"order_id": "o-1"},
            source="shop",
            key="o-1",
            subject="orders/o-1",
            correlationid="c-1",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        await transport.publish(topic, envelope.to_binary(sent, transport.binary_prefix))
        collector = Collector()
        await transport.subscribe(sub, collector)
        (got,) = await collector.wait(1, self.timeout)
        assert envelope.decode(got.message).evolve(headers={}) == sent

    async def test_fan_out_every_subscription_receives_every_message(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        first, second = _sub(topic), _sub(topic)
        await transport.declare([topic], [first, second])
        await self.publish_all(transport, topic, [WireMessage(str(i).encode()) for i in range(10)])
        a, b = Collector(), Collector()
        await transport.subscribe(first, a)
        await transport.subscribe(second, b)
        await a.wait(10, self.timeout)
        await b.wait(10, self.timeout)
        assert sorted(a.bodies()) == sorted(b.bodies()) == sorted(str(i).encode() for i in range(10))

    async def test_competing_consumers_split_messages_without_loss_or_duplicate(
        self, open_transport: OpenTransport
    ) -> None:
        first, second = await open_transport(), await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await first.declare([topic], [sub])
        a, b = Collector(), Collector()
        consumers = [await first.subscribe(sub, a), await second.subscribe(sub, b)]
        await self.wait_consuming(*consumers)
        count = 60
        await self.publish_all(first, topic, [WireMessage(str(i).encode(), key=f"k{i}") for i in range(count)])
        await wait_for(lambda: len(a.received) + len(b.received) >= count, self.timeout, f"{count} deliveries")
        bodies = a.bodies() + b.bodies()
        assert sorted(bodies) == sorted(str(i).encode() for i in range(count))
        assert a.received and b.received, "both consumers should get a share"

    async def test_subscription_declared_before_publish_keeps_early_messages(
        self, open_transport: OpenTransport
    ) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"early"))
        collector = Collector()
        await transport.subscribe(sub, collector)
        await collector.wait(1, self.timeout)
        assert collector.bodies() == [b"early"]

    async def test_new_subscription_sees_history_only_if_the_broker_keeps_it(
        self, open_transport: OpenTransport
    ) -> None:
        transport = await open_transport()
        topic = unique("ct")
        await transport.declare([topic], [])
        if transport.features.refuses_unroutable:
            with pytest.raises(errors.TransportError):  # refused, never confirmed and dropped
                await transport.publish(topic, WireMessage(b"before"))
        else:
            await transport.publish(topic, WireMessage(b"before"))
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"after"))
        collector = Collector()
        await transport.subscribe(sub, collector)
        await wait_for(lambda: b"after" in collector.bodies(), self.timeout, "the later message")
        if transport.features.history_for_new_groups:
            await wait_for(lambda: b"before" in collector.bodies(), self.timeout, "the message from before")
        else:
            # A negative check, so a short window: "before" would come ahead of "after"
            # on an ordered broker; the window only catches a straggler of an unordered one.
            await remains(lambda: b"before" not in collector.bodies(), 0.2, "no message from before the subscription")

    # -- settling ----------------------------------------------------------------

    async def test_acked_message_is_not_delivered_again(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"once"))
        first = Collector()
        consumer = await transport.subscribe(sub, first)
        await first.wait(1, self.timeout)
        await consumer.stop()
        await transport.close()
        again = await open_transport()
        second = Collector()
        await self.wait_consuming(await again.subscribe(sub, second))
        await again.publish(topic, WireMessage(b"marker"))
        await wait_for(lambda: b"marker" in second.bodies(), self.timeout, "the marker")
        assert second.bodies() == [b"marker"]

    async def test_nack_redelivers_after_the_delay_with_the_next_attempt(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"again"))

        async def nack_first(delivery: ports.Delivery) -> None:
            await (delivery.nack(0.5) if delivery.attempt == 1 else delivery.ack())

        collector = Collector(settle=nack_first)
        await transport.subscribe(sub, collector)
        first, second = await collector.wait(2, self.timeout)
        assert (second.message.body, first.attempt, second.attempt) == (b"again", 1, 2)
        assert second.at - first.at >= 0.45

    async def test_nacked_message_does_not_hold_back_others(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"slow", key="a"))
        await transport.publish(topic, WireMessage(b"next", key="b"))

        async def nack_slow(delivery: ports.Delivery) -> None:
            if delivery.message.body == b"slow" and delivery.attempt == 1:
                await delivery.nack(3.0)
            else:
                await delivery.ack()

        collector = Collector(settle=nack_slow)
        await transport.subscribe(sub, collector)
        await collector.wait(3, self.timeout)
        assert collector.bodies() == [b"slow", b"next", b"slow"]

    async def test_unsettled_delivery_is_redelivered_after_close(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        await transport.publish(topic, WireMessage(b"unsettled"))

        async def keep(delivery: ports.Delivery) -> None:
            return None

        first = Collector(settle=keep)
        await transport.subscribe(sub, first)
        await first.wait(1, self.timeout)
        await transport.close()
        again = await open_transport()
        second = Collector()
        await again.subscribe(sub, second)
        await second.wait(1, self.timeout)
        assert second.bodies()[0] == b"unsettled"

    async def test_prefetch_bounds_unsettled_deliveries(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic, prefetch=5)
        await transport.declare([topic], [sub])
        await self.publish_all(transport, topic, [WireMessage(str(i).encode()) for i in range(20)])

        async def keep(delivery: ports.Delivery) -> None:
            return None

        collector = Collector(settle=keep)
        await transport.subscribe(sub, collector)
        await collector.wait(5, self.timeout)
        # A negative check, so a short window: the other 15 are waiting in the broker,
        # and an unbounded transport would hand them out within it.
        await remains(lambda: len(collector.received) == 5, 0.3, "5 unsettled deliveries, no more")
        for received in collector.received:
            await received.delivery.ack()
        await collector.wait(10, self.timeout)

    # -- ordering ----------------------------------------------------------------

    async def test_messages_with_one_key_arrive_in_publish_order(self, open_transport: OpenTransport) -> None:
        if not (transport := await open_transport()).features.ordered_per_key:
            pytest.skip("transport does not promise per-key order")  # capability, not environment
        topic = unique("ct")
        sub = _sub(topic)
        await transport.declare([topic], [sub])
        keys = [f"k{i}" for i in range(5)]
        await self.publish_all(
            transport, topic, [WireMessage(f"{k}:{n}".encode(), key=k) for n in range(20) for k in keys]
        )
        collector = Collector()
        await transport.subscribe(sub, collector)
        await collector.wait(100, self.timeout)
        for key in keys:
            sequence = [int(b.split(b":")[1]) for b in collector.bodies() if b.startswith(f"{key}:".encode())]
            assert sequence == list(range(20)), f"key {key} out of order: {sequence}"

    async def test_publish_many_confirms_each_and_keeps_order_per_key(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        sub = _sub(topic, prefetch=256)
        await transport.declare([topic], [sub])
        keys = [f"k{i}" for i in range(4)]
        sent = [(topic, WireMessage(f"{k}:{n}:".encode() + bytes(range(256)), key=k)) for n in range(50) for k in keys]
        assert await transport.publish_many(sent) == [None] * len(sent)
        collector = Collector()
        await transport.subscribe(sub, collector)
        await collector.wait(len(sent), self.timeout)
        assert sorted(collector.bodies()) == sorted(m.body for _, m in sent), "bodies differ from what was sent"
        if transport.features.ordered_per_key:
            for key in keys:
                sequence = [int(b.split(b":")[1]) for b in collector.bodies() if b.startswith(f"{key}:".encode())]
                assert sequence == list(range(50)), f"key {key} out of order: {sequence}"

    async def test_publish_many_reports_a_refusal_without_stopping_the_rest(
        self, open_transport: OpenTransport
    ) -> None:
        if not (transport := await open_transport()).features.refuses_unroutable:
            pytest.skip("transport confirms every well-formed publish")  # capability, not environment
        topic, nowhere = unique("ct"), unique("nowhere")
        sub = _sub(topic)
        await transport.declare([topic, nowhere], [sub])
        batch = [(topic, WireMessage(b"a")), (nowhere, WireMessage(b"lost")), (topic, WireMessage(b"b"))]
        results = await transport.publish_many(batch)
        assert results[0] is None and results[2] is None, results
        assert isinstance(results[1], errors.TransportError), results
        collector = Collector()
        await transport.subscribe(sub, collector)
        await collector.wait(2, self.timeout)
        assert sorted(collector.bodies()) == [b"a", b"b"]

    # -- errors and health ------------------------------------------------------

    async def test_publish_many_after_close_raises_transport_error(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        await transport.declare([topic], [])
        await transport.close()
        with pytest.raises(errors.TransportError):
            await transport.publish_many([(topic, WireMessage(b"late"))])

    async def test_publish_after_close_raises_transport_error(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        topic = unique("ct")
        await transport.declare([topic], [])
        await transport.close()
        with pytest.raises(errors.TransportError):
            await transport.publish(topic, WireMessage(b"late"))

    async def test_check_passes_when_connected(self, open_transport: OpenTransport) -> None:
        transport = await open_transport()
        started = time.monotonic()
        await transport.check()
        assert time.monotonic() - started < 5
