"""Pipelined JetStream publishing (``conveyor.transports.nats_publish``): each PubAck reaches its own publish.

Every publish in flight waits on one future keyed by its reply subject; a
refusal from the server, a message the client will not send and a duplicate
must each land on the right message of a pipelined batch, and no future may
outlive its publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.testing import unique
from conveyor.transports.nats import NatsTransport
from nats.js import JetStreamContext


@pytest.fixture
async def raw_js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def small_stream(nats_url: str, raw_js: JetStreamContext) -> AsyncIterator[NatsTransport]:
    """A transport on a stream of its own that refuses messages over 256 bytes."""
    stream = unique("PA").replace(".", "_").upper()
    transport = NatsTransport(nats_url, stream=stream, subject_prefix=stream.lower())
    await transport.connect()
    info = await raw_js.stream_info(stream)
    info.config.max_msg_size = 256
    await raw_js.update_stream(info.config)
    yield transport
    await transport.close()
    await raw_js.delete_stream(stream)


def _pending(transport: NatsTransport) -> int:
    return len(transport._pub_acks()._futures)


async def test_publish_many_matches_each_puback_to_its_message(small_stream: NatsTransport) -> None:
    transport = small_stream
    topic = unique("pa")
    await transport.declare([topic], [ports.Subscription(name=unique("pa"), topic=topic)])
    messages = [(topic, WireMessage(f"m{n}".encode(), message_id=unique("id"))) for n in range(300)]
    messages[7] = (topic, WireMessage(b"x" * 1024, message_id=unique("id")))  # refused by the stream
    messages[250] = (topic, WireMessage(b"x" * 2_000_000, message_id=unique("id")))  # over the server's max_payload
    results = await transport.publish_many(messages)
    failed = {index: result for index, result in enumerate(results) if result is not None}
    assert sorted(failed) == [7, 250]
    assert type(failed[7]) is errors.TransportError  # a refusal for good, not an outage
    assert "maximum" in str(failed[7]).lower() or "size" in str(failed[7]).lower(), failed[7]
    assert isinstance(failed[250], errors.TransportError)
    assert _pending(transport) == 0


async def test_concurrent_publishes_each_get_their_own_outcome(small_stream: NatsTransport) -> None:
    transport = small_stream
    topic = unique("pa")
    await transport.declare([topic], [])
    bodies = [b"x" * 1024 if n % 10 == 3 else b"ok" for n in range(100)]
    outcomes = await asyncio.gather(
        *(transport.publish(topic, WireMessage(body, message_id=unique("id"))) for body in bodies),
        return_exceptions=True,
    )
    refused = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, errors.TransportError)]
    assert refused == [n for n in range(100) if n % 10 == 3]
    assert all(outcome is None for n, outcome in enumerate(outcomes) if n not in refused)
    assert _pending(transport) == 0


async def test_publish_cancelled_while_waiting_leaves_no_future(small_stream: NatsTransport) -> None:
    transport = small_stream
    topic = unique("pa")
    await transport.declare([topic], [])
    tasks = [asyncio.create_task(transport.publish(topic, WireMessage(b"ok"))) for _ in range(50)]
    await asyncio.sleep(0)  # every publish has sent its message and waits for the PubAck
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert _pending(transport) == 0
    await transport.publish(topic, WireMessage(b"after"))  # late PubAcks of the cancelled ones are ignored
    assert _pending(transport) == 0


@pytest.fixture
async def error_stream(nats_url: str, raw_js: JetStreamContext) -> AsyncIterator[NatsTransport]:
    """A transport on a stream named ``error``: every PubAck holds ``"stream":"error"``."""
    prefix = unique("perr").replace(".", "_")
    transport = NatsTransport(nats_url, stream="error", subject_prefix=prefix)
    await transport.connect()
    yield transport
    await transport.close()
    await raw_js.delete_stream("error")


async def test_stream_named_error_acknowledges_publishes(error_stream: NatsTransport, raw_js: JetStreamContext) -> None:
    transport = error_stream
    topic = unique("pa")
    await transport.declare([topic], [])
    await transport.publish(topic, WireMessage(b"one", message_id=unique("id")))
    results = await transport.publish_many(
        [(topic, WireMessage(f"m{n}".encode(), message_id=unique("id"))) for n in range(20)]
    )
    assert results == [None] * 20
    duplicate = WireMessage(b"again", message_id="same-id")
    assert await transport.publish_many([(topic, duplicate), (topic, duplicate)]) == [None, None]
    assert (await raw_js.stream_info("error")).state.messages == 22
    assert _pending(transport) == 0
