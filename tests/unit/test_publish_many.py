"""Publisher.publish_many: pipelined, ordered per key, and every refusal reported."""

from __future__ import annotations

import pytest
from conveyor import Publisher, PublishManyError, errors, ports
from conveyor.testing import Collector, unique
from conveyor.transports.memory import MemoryTransport


async def test_publish_many_sends_every_event_in_order_with_its_key() -> None:
    url = f"memory://{unique('pm')}"
    topic = unique("t")
    async with Publisher(url, source="svc") as publisher:
        transport = publisher._transport
        sub = ports.Subscription(name=unique("s"), topic=topic)
        await transport.declare([topic], [sub])
        events = await publisher.publish_many(
            topic, [{"n": n} for n in range(30)], key=lambda item: f"k{item['n'] % 3}"
        )
        collector = Collector()
        await transport.subscribe(sub, collector)
        await collector.wait(30, 5)
    assert [e.key for e in events[:4]] == ["k0", "k1", "k2", "k0"]
    assert [r.message.message_id for r in collector.received] == [e.id for e in events]


class _RefusingTransport(MemoryTransport):
    async def publish_many(self, messages):  # type: ignore[no-untyped-def]
        results = await super().publish_many(messages)
        return [errors.TransportError("refused") if i == 1 else r for i, r in enumerate(results)]


async def test_publish_many_reports_which_events_were_refused() -> None:
    topic = unique("t")
    publisher = Publisher(f"memory://{unique('pm')}", source="svc")
    publisher._transport = _RefusingTransport(f"memory://{unique('pm')}")
    async with publisher:
        with pytest.raises(PublishManyError) as caught:
            await publisher.publish_many(topic, ["a", "b", "c"])
    assert [e.data for e in caught.value.sent] == [b'"a"', b'"c"']
    assert [(e.data, str(err)) for e, err in caught.value.failed] == [(b'"b"', "refused")]
    assert "1 of 3 messages were refused" in str(caught.value)


async def test_publish_many_refuses_an_invalid_topic_before_sending_anything() -> None:
    async with Publisher(f"memory://{unique('pm')}", source="svc") as publisher:
        with pytest.raises(errors.ConfigurationError):
            await publisher.publish_many("bad topic >", ["a"])
