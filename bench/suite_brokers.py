"""Consume and publish through Conveyor against the raw clients: RabbitMQ, NATS JetStream, memory.

Rows (1 KiB payloads, one process, one event loop for both sides; the raw side
is the fastest fair use of the client library Conveyor's transport itself
uses: aiormq for RabbitMQ, nats-py for NATS):

* Both sides of a broker row use the same topology, declared through
  Conveyor's transport (:func:`topology`): on RabbitMQ the topic exchange
  ``conveyor`` and the subscription's quorum queue with its arguments; on NATS
  the stream ``CONVEYOR`` and the subscription's durable pull consumer. They
  send the same bytes: the CloudEvent ``Publisher.publish`` builds for
  :data:`DATA` (body, headers or AMQP properties, a fresh id per message).
  The raw side's messages are built before its clock starts; Conveyor builds
  its envelopes as it publishes.
* **consume**: a backlog is published first, then timed from the first
  delivery to the last ack. Raw RabbitMQ is aiormq's ``basic_consume``
  (prefetch 100, ``basic_ack`` each); raw NATS keeps pull requests
  outstanding on the durable with nats-py's core client, as Conveyor's
  transport does (at most 100 requested or unacked, ``+ACK`` each:
  :func:`raw_clients.nats_pull`), about twice as fast here as a pull
  subscription's ``fetch(100)``. Conveyor runs the real :class:`Worker` with a
  no-op handler taking the decoded CloudEvent's data.
* **publish**: at most 256 confirmed publishes in flight on both sides. Raw
  RabbitMQ: aiormq ``basic_publish`` with publisher confirms, mandatory, as
  Conveyor's transport publishes, 256 at a time (:data:`RABBIT_CHUNKS`).
  Raw NATS: publishes with a reply subject, the PubAcks matched to futures
  on one subscription, a sliding window (:data:`NATS_PUBLISHER`,
  :data:`NATS_CHUNKS`). Conveyor: :meth:`Publisher.publish` in a sliding
  window, and :meth:`Publisher.publish_many` in chunks of 256.
* **memory runtime overhead**: the memory transport acking in its callback,
  against the worker running a no-op handler: the microseconds per message
  the runtime adds.

Run alone: ``.venv/bin/python -m bench.suite_brokers [--runs 3] [--loop uvloop]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor import Publisher, envelope, ports, registry, transports
from conveyor.runtime.failures import dead_letter_topic
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.transports import nats_wire, rabbit_wire
from conveyor.transports.memory import MemoryTransport
from conveyor.transports.nats import NatsTransport
from conveyor.transports.rabbit import RabbitTransport

from bench import harness, raw_clients

URLS = {"rabbit": raw_clients.DEFAULT_RABBIT_URL, "nats": raw_clients.DEFAULT_NATS_URL}
DATA = {"order_id": "o-1", "note": "x" * 980}
WINDOW = 256
CONSUME_BATCH = 100
"""Raw consumers' prefetch: RabbitMQ's QoS, NATS's most messages requested or unacked."""
NATS_PUBLISHER: raw_clients.NatsPublisher = "requests"
"""Raw NATS publishes: a reply subject each, PubAcks on one subscription (smoke: 30k/s; ``js.publish_async`` 22k/s)."""
NATS_CHUNKS = False
"""Raw NATS publishes in a sliding window (a window at a time measured the same)."""
RABBIT_CHUNKS = True
"""Raw RabbitMQ publishes 256 at a time: in smoke runs faster than a sliding window of 256 (3.7k/s against 3.0k/s)."""
CONSUME = {"rabbit": 20_000, "nats": 20_000}
PUBLISH = {"rabbit": 10_000, "nats": 20_000}
MEMORY = 50_000
CONCURRENCY = CONSUME_BATCH // 2
"""The consume rows' worker concurrency: its prefetch (twice the concurrency) is the raw consumers'."""


@dataclass(frozen=True)
class Topology:
    """What both sides of a broker row use, declared once through Conveyor's transport.

    Attributes:
        broker: ``"rabbit"`` or ``"nats"``.
        topic: the Conveyor topic.
        name: its subscription's name.
        exchange: RabbitMQ: the topic exchange; NATS: the stream.
        subject: RabbitMQ: the routing key; NATS: the subject.
        queue: RabbitMQ: the subscription's (quorum) queue; NATS: its durable pull consumer.
    """

    broker: str
    topic: str
    name: str
    exchange: str
    subject: str
    queue: str


def _worker(transport: ports.Transport, topic: str, name: str, on_payload: Callable[[], None]) -> Worker:
    """The consume rows' worker: one no-op handler, concurrency :data:`CONCURRENCY`."""

    @registry.on(topic, name=name, concurrency=CONCURRENCY)
    async def noop(payload: bytes) -> None:
        on_payload()

    return Worker(registry.Registry.of(noop).handlers, transport, source="bench", concurrency=CONCURRENCY)


@contextlib.asynccontextmanager
async def topology(broker: str, *, consume: bool) -> AsyncIterator[Topology]:
    """Declare a fresh topic and subscription as Conveyor's side of the row does; drop their messages after.

    Consume rows declare what their worker declares (``Worker.declare``),
    publish rows one subscription of the topic with the default settings (so
    that the broker keeps, and confirms, what is published). Both sides of a
    row then use the same exchange, queue type and arguments (a quorum queue
    on RabbitMQ), stream and durable consumer: the raw side publishes to and
    consumes from what Conveyor's transport made. Afterwards the messages are
    dropped (RabbitMQ: the queue; NATS: the subject's messages and the
    durable), so that no run starts with a fuller broker than the other.
    """
    transport = transports.create(URLS[broker])
    await transport.connect()
    topic, name = unique("bench"), unique("bench")
    try:
        if consume:
            await _worker(transport, topic, name, lambda: None).declare()
        else:
            await transport.declare([topic], [ports.Subscription(name=name, topic=topic)])
        if isinstance(transport, RabbitTransport):
            declared = Topology(broker, topic, name, transport.exchange, topic, transport.queue_name(name))
        else:
            assert isinstance(transport, NatsTransport)
            durable = nats_wire.durable_name(name)
            declared = Topology(broker, topic, name, transport.stream, transport.subject(topic), durable)
    finally:
        await transport.close()
    try:
        yield declared
    finally:
        await _drop(declared)


async def _drop(declared: Topology) -> None:
    """Delete what a row left on the broker: its queue, or its durables and its subject's messages.

    RabbitMQ's other queues of the row (binding record, dead-letter keeper)
    are empty and go with the harness's sweep at the end of the run; NATS
    durables have no such sweep, so the worker's dead-letter keeper goes here.
    """
    if declared.broker == "rabbit":
        async with raw_clients.rabbit_connection(URLS["rabbit"]) as connection:
            channel = await connection.channel()
            await channel.queue_delete(declared.queue)
        return
    import nats
    import nats.js.errors

    client = await nats.connect(URLS["nats"])
    try:
        jetstream = client.jetstream()
        keeper = nats_wire.durable_name(dead_letter_topic(declared.topic))
        for durable in (declared.queue, keeper):
            with contextlib.suppress(nats.js.errors.NotFoundError):  # publish rows declare no keeper
                await jetstream.delete_consumer(declared.exchange, durable)
        await jetstream.purge_stream(declared.exchange, subject=declared.subject)
    finally:
        await client.close()


def wire_messages(topic: str, count: int, prefix: str) -> list[envelope.WireMessage]:
    """``count`` copies of the CloudEvent ``Publisher.publish(topic, DATA)`` sends, each under a fresh id."""
    wire = envelope.to_binary(envelope.create(topic, DATA, source="bench"), prefix)
    return [_with_id(wire) for _ in range(count)]


def amqp_messages(topic: str, count: int) -> list[raw_clients.AmqpMessage]:
    """The wire messages of :func:`wire_messages` as Conveyor's RabbitMQ transport sends them (body, properties)."""
    return [(m.body, rabbit_wire.outgoing_properties(m)) for m in wire_messages(topic, count, envelope.AMQP_PREFIX)]


def nats_messages(topic: str, count: int) -> list[raw_clients.NatsMessage]:
    """The wire messages of :func:`wire_messages` as Conveyor's NATS transport sends them (payload, headers)."""
    return [(m.body, nats_wire.outgoing_headers(m)) for m in wire_messages(topic, count, envelope.NATS_PREFIX)]


@contextlib.asynccontextmanager
async def nats_client() -> AsyncIterator[Any]:
    """A nats-py client, of the class Conveyor's transport uses (nats-py's, with a faster header parser)."""
    client = nats_wire.WireClient()
    await client.connect(servers=[URLS["nats"]])
    try:
        yield client
    finally:
        await client.close()


async def raw_rabbit_publish(
    connection: Any, declared: Topology, messages: list[raw_clients.AmqpMessage], chunks: bool = RABBIT_CHUNKS
) -> float:
    """aiormq ``basic_publish`` of ``messages``, mandatory, to the row's exchange, a window of confirms; seconds."""
    return await raw_clients.rabbit_publish(
        connection, declared.subject, messages, WINDOW, exchange=declared.exchange, mandatory=True, chunks=chunks
    )


async def raw_consume(broker: str, count: int) -> float:
    """Raw client: consume a backlog of Conveyor's wire messages from the worker's queue or durable; msg/s.

    RabbitMQ: aiormq ``basic_consume``, prefetch 100, ``basic_ack`` each.
    NATS: pull requests kept outstanding on the durable, at most 100 requested
    or unacked, ``+ACK`` each (:func:`raw_clients.nats_pull`).
    """
    async with topology(broker, consume=True) as declared:
        if broker == "rabbit":
            async with raw_clients.rabbit_connection(URLS["rabbit"]) as connection:
                await raw_rabbit_publish(connection, declared, amqp_messages(declared.topic, count))
                seconds = await raw_clients.rabbit_consume(connection, declared.queue, count, CONSUME_BATCH)
        else:
            async with nats_client() as client:
                jetstream = client.jetstream()
                backlog = nats_messages(declared.topic, count)
                await raw_clients.nats_publish(jetstream, declared.subject, backlog, WINDOW, NATS_PUBLISHER)
                seconds = await raw_clients.nats_pull(client, declared.exchange, declared.queue, count, CONSUME_BATCH)
    return count / seconds


async def raw_publish(
    broker: str, count: int, publisher: raw_clients.NatsPublisher = NATS_PUBLISHER, chunks: bool | None = None
) -> float:
    """Raw client: send Conveyor's wire messages (pre-built) to the row's topology, a window of confirms; msg/s.

    RabbitMQ: aiormq with publisher confirms, mandatory, persistent, the same
    properties and headers table. NATS: the same headers (``Nats-Msg-Id``...),
    pipelined by ``publisher``. ``chunks``: a window at a time instead of a
    sliding window (default: :data:`RABBIT_CHUNKS`, :data:`NATS_CHUNKS`).
    """
    async with topology(broker, consume=False) as declared:
        if broker == "rabbit":
            messages = amqp_messages(declared.topic, count)
            async with raw_clients.rabbit_connection(URLS["rabbit"]) as connection:
                seconds = await raw_rabbit_publish(
                    connection, declared, messages, RABBIT_CHUNKS if chunks is None else chunks
                )
        else:
            backlog = nats_messages(declared.topic, count)
            async with nats_client() as client:
                seconds = await raw_clients.nats_publish(
                    client.jetstream(), declared.subject, backlog, WINDOW, publisher,
                    chunks=NATS_CHUNKS if chunks is None else chunks,
                )  # fmt: skip
    return count / seconds


async def worker_consume(transport: ports.Transport, count: int, declared: Topology | None = None) -> float:
    """Conveyor: the worker with a no-op handler over a published backlog; msg/s from first to last.

    Args:
        transport: a transport of the row's broker, not connected yet.
        count: messages to consume.
        declared: the row's topology (default: a fresh topic, for the memory transport).
    """
    await transport.connect()
    topic, name = (declared.topic, declared.name) if declared else (unique("bench"), unique("bench"))
    stamps: list[float] = []
    done = asyncio.Event()

    def stamp() -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == count:
            done.set()

    worker = _worker(transport, topic, name, stamp)
    await worker.declare()
    messages = wire_messages(topic, count, transport.binary_prefix)
    for start in range(0, count, WINDOW):
        results = await transport.publish_many([(topic, m) for m in messages[start : start + WINDOW]])
        failed = [r for r in results if r is not None]
        assert not failed, failed[0]
    await worker.start()
    await asyncio.wait_for(done.wait(), timeout=raw_clients.consume_deadline(count))
    elapsed = stamps[-1] - stamps[0]
    await worker.stop(5)
    await transport.close()
    return (count - 1) / elapsed


async def conveyor_consume(broker: str, count: int) -> float:
    """Conveyor's side of a consume row: :func:`worker_consume` on the row's topology; msg/s."""
    async with topology(broker, consume=True) as declared:
        return await worker_consume(transports.create(URLS[broker]), count, declared)


def _with_id(message: envelope.WireMessage) -> envelope.WireMessage:
    """The same event under a new id (each copy is a distinct message to the inbox and the broker)."""
    new_id = envelope.new_id()
    headers = {k: (new_id if k.endswith("id") and v == message.message_id else v) for k, v in message.headers.items()}
    return envelope.WireMessage(message.body, headers, key=message.key, message_id=new_id)


async def conveyor_publish_window(broker: str, count: int) -> float:
    """Conveyor ``Publisher.publish``, one task per call, a sliding window of :data:`WINDOW` unfinished; msg/s."""
    async with topology(broker, consume=False) as declared, Publisher(URLS[broker], source="bench") as publisher:

        async def send(_: int) -> Awaitable[object]:
            task: asyncio.Future[object] = asyncio.ensure_future(publisher.publish(declared.topic, DATA))
            return task

        seconds = await raw_clients.run_pipelined(send, count, WINDOW)
    return count / seconds


async def conveyor_publish_many(broker: str, count: int) -> float:
    """Conveyor ``Publisher.publish_many`` in chunks of the window; msg/s."""
    async with topology(broker, consume=False) as declared, Publisher(URLS[broker], source="bench") as publisher:
        started = time.perf_counter()
        for start in range(0, count, WINDOW):
            await publisher.publish_many(declared.topic, [DATA] * min(WINDOW, count - start))
        return count / (time.perf_counter() - started)


async def memory_raw(count: int) -> float:
    """The memory transport alone, acking in its callback; msg/s."""
    transport = MemoryTransport(f"memory://{unique('bench')}")
    await transport.connect()
    sub = ports.Subscription(name=unique("raw"), topic="orders", prefetch=64)
    await transport.declare(["orders"], [sub])
    wire = envelope.to_binary(envelope.create("orders", DATA, source="bench"), transport.binary_prefix)
    await transport.publish_many([("orders", _with_id(wire)) for _ in range(count)])
    done, seen = asyncio.Event(), 0

    async def ack(delivery: ports.Delivery) -> None:
        nonlocal seen
        await delivery.ack()
        seen += 1
        if seen == count:
            done.set()

    started = time.perf_counter()
    await transport.subscribe(sub, ack)
    await done.wait()
    elapsed = time.perf_counter() - started
    await transport.close()
    return count / elapsed


def rows() -> list[harness.Row]:
    """Every row of this suite."""
    same = "both: the same topology (declared by Conveyor's transport) and the same CloudEvent bytes and headers"
    out = [
        harness.Row(
            "rabbit consume",
            lambda: raw_consume("rabbit", CONSUME["rabbit"]),
            lambda: conveyor_consume("rabbit", CONSUME["rabbit"]),
            goal=0.9,
            note=(
                f"raw: aiormq basic_consume on the worker's quorum queue, prefetch {CONSUME_BATCH}, basic_ack each "
                f"in the delivery callback; Conveyor: worker, concurrency {CONCURRENCY}; {same}"
            ),
        ),
        harness.Row(
            "nats consume",
            lambda: raw_consume("nats", CONSUME["nats"]),
            lambda: conveyor_consume("nats", CONSUME["nats"]),
            goal=1.0,
            note=(
                f"raw: nats-py core client (Conveyor's header parser) keeping pull requests outstanding on the "
                f"worker's durable, at most {CONSUME_BATCH} requested or unacked, +ACK each; "
                f"Conveyor: worker, concurrency {CONCURRENCY}; {same}"
            ),
        ),
    ]
    window = {True: f"{WINDOW} at a time", False: f"a sliding window of {WINDOW}"}
    raw_pattern = {
        "rabbit": f"aiormq basic_publish with publisher confirms, mandatory, {window[RABBIT_CHUNKS]}",
        "nats": (
            "nats-py publishes with a reply subject, PubAcks matched to futures on one subscription, "
            f"{window[NATS_CHUNKS]}"
            if NATS_PUBLISHER == "requests"
            else f"nats-py js.publish_async, {window[NATS_CHUNKS]}"
        ),
    }
    for broker, goal in (("rabbit", 0.9), ("nats", 0.9)):
        count = PUBLISH[broker]
        raw = functools.partial(raw_publish, broker, count)
        out.append(
            harness.Row(
                f"{broker} publish, window {WINDOW}",
                raw,
                functools.partial(conveyor_publish_window, broker, count),
                goal=goal,
                note=f"raw: {raw_pattern[broker]}; Conveyor: Publisher.publish, {window[False]}; {same}",
            )
        )
        out.append(
            harness.Row(
                f"{broker} publish_many({WINDOW})",
                raw,
                functools.partial(conveyor_publish_many, broker, count),
                goal=goal,
                note=f"raw: {raw_pattern[broker]}; Conveyor: Publisher.publish_many in chunks of {WINDOW}; {same}",
            )
        )
    out.append(
        harness.Row(
            "memory runtime overhead",
            lambda: memory_raw(MEMORY),
            lambda: worker_consume(MemoryTransport(f"memory://{unique('bench')}"), MEMORY),
            goal=0.0,
            budget=5.0,
            note="raw: memory transport acking in its callback; Conveyor: worker with a no-op handler",
        )
    )
    return out


def suite() -> contextlib.AbstractAsyncContextManager[Sequence[harness.Row]]:
    """The suite (RabbitMQ and NATS are the local services)."""
    return harness.rows_only(rows())


if __name__ == "__main__":
    harness.main_for(suite)
