"""Consume and publish through Conveyor against the raw clients: RabbitMQ, NATS JetStream, memory.

Rows (1 KiB payloads, one process; the raw side is the fastest fair variant):

* **consume**: a backlog is published first, then timed from the first
  delivery to the last ack. Raw RabbitMQ is aio-pika's callback consumer
  (prefetch 100, ``ack()`` each); raw NATS a durable pull subscription
  (``fetch(100)``, ``ack()`` each). Conveyor runs the real :class:`Worker`
  with a no-op handler taking the decoded CloudEvent's data.
* **publish, window 256**: the same sliding window of 256 confirmed publishes
  on both sides (aio-pika with publisher confirms, JetStream awaiting each
  PubAck; Conveyor's :meth:`Publisher.publish`), and Conveyor's
  :meth:`Publisher.publish_many` in chunks of 256. Both sides publish the
  same dict as JSON (the raw side serialises it with orjson, as Conveyor
  does); Conveyor adds the CloudEvent: an id, a time and its headers.
* **memory runtime overhead**: the memory transport acking in its callback,
  against the worker running a no-op handler: the microseconds per message
  the runtime adds.

Run alone: ``.venv/bin/python -m bench.suite_brokers [--runs 3]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from conveyor import Publisher, envelope, ports, registry, transports
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.transports.memory import MemoryTransport

from bench import harness, raw_clients

URLS = {"rabbit": raw_clients.DEFAULT_RABBIT_URL, "nats": raw_clients.DEFAULT_NATS_URL}
DATA = {"order_id": "o-1", "note": "x" * 980}
WINDOW = 256
CONSUME = {"rabbit": 20_000, "nats": 20_000}
PUBLISH = {"rabbit": 10_000, "nats": 20_000}
MEMORY = 50_000
CONCURRENCY = 16


async def rabbit_callback_consume(count: int, prefetch: int = raw_clients.DEFAULT_CONSUME_BATCH) -> float:
    """Raw aio-pika: callback consumer acking each message; msg/s over a published backlog."""
    async with raw_clients.rabbit_queue(URLS["rabbit"]) as (connection, queue):
        await raw_clients.rabbit_publish(connection, queue, count, WINDOW)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        declared = await channel.get_queue(queue, ensure=True)
        done, seen, first = asyncio.Event(), 0, 0.0

        async def on_message(message: Any) -> None:
            nonlocal seen, first
            if seen == 0:
                first = time.perf_counter()
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        tag = await declared.consume(on_message)
        await asyncio.wait_for(done.wait(), raw_clients.consume_deadline(count))
        elapsed = time.perf_counter() - first
        await declared.cancel(tag)
        await channel.close()
        return count / elapsed


async def raw_publish(broker: str, count: int) -> float:
    """Raw client: serialise the same data to JSON and publish it, a sliding window of confirmed publishes; msg/s."""
    if broker == "rabbit":
        import aio_pika

        async with raw_clients.rabbit_queue(URLS["rabbit"]) as (connection, queue):
            channel = await connection.channel(publisher_confirms=True)
            exchange = channel.default_exchange

            async def publish(_: int) -> object:
                message = aio_pika.Message(orjson.dumps(DATA), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                return await exchange.publish(message, routing_key=queue)

            seconds = await raw_clients.run_windowed(publish, count, WINDOW)
            await channel.close()
    else:
        async with raw_clients.nats_stream(URLS["nats"]) as (jetstream, _, subject):
            seconds = await raw_clients.run_windowed(
                lambda _: jetstream.publish(subject, orjson.dumps(DATA)), count, WINDOW
            )
    return count / seconds


async def worker_consume(transport: ports.Transport, count: int, publish: bool = True) -> float:
    """Conveyor: the worker with a no-op handler over a published backlog; msg/s from first to last."""
    await transport.connect()
    topic, name = unique("bench"), unique("bench")
    stamps: list[float] = []
    done = asyncio.Event()

    @registry.on(topic, name=name, concurrency=CONCURRENCY)
    async def noop(payload: bytes) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == count:
            done.set()

    worker = Worker(registry.Registry.of(noop).handlers, transport, source="bench", concurrency=CONCURRENCY)
    await worker.declare()
    wire = envelope.to_binary(envelope.create(topic, DATA, source="bench"), transport.binary_prefix)
    for start in range(0, count, WINDOW):
        batch = [(topic, _with_id(wire)) for _ in range(min(WINDOW, count - start))]
        failed = [r for r in await transport.publish_many(batch) if r is not None]
        assert not failed, failed[0]
    await worker.start()
    await asyncio.wait_for(done.wait(), timeout=raw_clients.consume_deadline(count))
    elapsed = stamps[-1] - stamps[0]
    await worker.stop(5)
    await transport.close()
    return (count - 1) / elapsed


def _with_id(message: envelope.WireMessage) -> envelope.WireMessage:
    """The same event under a new id (each copy is a distinct message to the inbox and the broker)."""
    new_id = unique("e")
    headers = {k: (new_id if k.endswith("id") and v == message.message_id else v) for k, v in message.headers.items()}
    return envelope.WireMessage(message.body, headers, key=message.key, message_id=new_id)


@contextlib.asynccontextmanager
async def _declared_publisher(url: str) -> AsyncIterator[tuple[Publisher, str]]:
    async with Publisher(url, source="bench") as publisher:
        topic = unique("bench")
        sub = ports.Subscription(name=unique("bench"), topic=topic)
        await publisher._transport.declare([topic], [sub])  # so the broker keeps (and confirms) them
        yield publisher, topic


async def conveyor_publish_window(url: str, count: int) -> float:
    """Conveyor ``Publisher.publish`` with a sliding window of concurrent calls; msg/s."""
    async with _declared_publisher(url) as (publisher, topic):
        seconds = await raw_clients.run_windowed(lambda _: publisher.publish(topic, DATA), count, WINDOW)
    return count / seconds


async def conveyor_publish_many(url: str, count: int) -> float:
    """Conveyor ``Publisher.publish_many`` in chunks of the window; msg/s."""
    async with _declared_publisher(url) as (publisher, topic):
        started = time.perf_counter()
        for start in range(0, count, WINDOW):
            await publisher.publish_many(topic, [DATA] * min(WINDOW, count - start))
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
    out = [
        harness.Row(
            "rabbit consume",
            lambda: rabbit_callback_consume(CONSUME["rabbit"]),
            lambda: worker_consume(transports.create(URLS["rabbit"]), CONSUME["rabbit"]),
            goal=0.95,
            note="raw: aio-pika callback consumer, prefetch 100, ack each; Conveyor: worker, concurrency 16",
        ),
        harness.Row(
            "nats consume",
            lambda: raw_clients.raw_consume_rate("nats", CONSUME["nats"]),
            lambda: worker_consume(transports.create(URLS["nats"]), CONSUME["nats"]),
            goal=0.95,
            note="raw: pull subscription, fetch(100), ack each; Conveyor: worker, concurrency 16",
        ),
    ]
    for broker, goal in (("rabbit", 0.9), ("nats", 0.85)):
        count = PUBLISH[broker]
        raw = lambda b=broker, c=count: raw_publish(b, c)  # noqa: E731
        out.append(
            harness.Row(
                f"{broker} publish, window {WINDOW}",
                raw,
                lambda b=broker, c=count: conveyor_publish_window(URLS[b], c),
                goal=goal,
                note=f"the same sliding window of {WINDOW} confirmed publishes; Conveyor: Publisher.publish",
            )
        )
        out.append(
            harness.Row(
                f"{broker} publish_many({WINDOW})",
                raw,
                lambda b=broker, c=count: conveyor_publish_many(URLS[b], c),
                goal=goal,
                note=f"Conveyor: Publisher.publish_many in chunks of {WINDOW}; raw: sliding window of {WINDOW}",
            )
        )
    out.append(
        harness.Row(
            "memory runtime overhead",
            lambda: memory_raw(MEMORY),
            lambda: worker_consume(MemoryTransport(f"memory://{unique('bench')}"), MEMORY),
            goal=0.0,
            budget=10.0,
            note="raw: memory transport acking in its callback; Conveyor: worker with a no-op handler",
        )
    )
    return out


def suite() -> contextlib.AbstractAsyncContextManager[Sequence[harness.Row]]:
    """The suite (RabbitMQ and NATS are the local services)."""
    return harness.rows_only(rows())


if __name__ == "__main__":
    harness.main_for(suite)
