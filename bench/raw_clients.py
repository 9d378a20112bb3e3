"""Throughput of the raw broker clients, as a baseline for Conveyor's transports.

For each broker, one process, 1 KiB messages, every message acknowledged individually:

* **RabbitMQ (aiormq, the client under Conveyor's transport):** publish with publisher
  confirms (persistent messages) to a fresh durable queue, one at a time and with a window
  of ``basic_publish`` calls awaiting their confirm; consume with ``basic_consume``,
  prefetch 100 and ``basic_ack`` per message.
* **NATS JetStream (nats-py):** publish awaiting each PubAck, one at a time, and pipelined
  with a window of PubAcks outstanding, two ways: ``js.publish_async``, and plain publishes
  with a reply subject whose PubAcks one subscription matches to their futures (the
  default: faster); consume from a durable with ``fetch(100)`` on a pull subscription, and
  with pull requests kept outstanding (at most 100 requested or unacked) as Conveyor's
  transport does (the default: about twice as fast), ``+ACK`` per message.
* **Kafka (aiokafka on a Tansu broker):** publish with ``acks="all"`` via ``send_and_wait``
  and via ``send`` + gathering the delivery futures in batches; consume in a consumer group
  with ``enable_auto_commit=False``, committing after every message and once per batch.

Consume rates are measured from the first delivery to the last ack/commit, over a backlog
published beforehand, so group joins and subscription set-up are excluded.
Each run uses unique queue/stream/topic names and deletes them afterwards.

Usage::

    .venv/bin/python bench/raw_clients.py --count 5000 --brokers rabbit,nats,kafka

The building blocks are importable for other benchmarks, e.g.::

    rate = await raw_consume_rate("nats", 5000)
    rate = await raw_publish_rate("kafka", 5000, window=1000, target="127.0.0.1:9092")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

Broker = Literal["rabbit", "nats", "kafka"]
KafkaCommit = Literal["message", "batch"]

BROKERS: tuple[Broker, ...] = get_args(Broker)
PAYLOAD = b"x" * 1024
DEFAULT_RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_WINDOW = 100
DEFAULT_KAFKA_BATCH = 1000
DEFAULT_CONSUME_BATCH = 100


@dataclass(frozen=True)
class Result:
    """One measured phase.

    Attributes:
        broker: Which broker.
        operation: ``publish`` or ``consume``.
        variant: How it was done (window, ack or commit style).
        count: Messages handled.
        seconds: Wall-clock time of the phase.
    """

    broker: str
    operation: str
    variant: str
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.count / self.seconds if self.seconds > 0 else float("inf")


def unique_name(prefix: str) -> str:
    """Return ``<prefix>-<12 hex digits>``: a queue/stream/topic name no other run uses.

    Args:
        prefix: Readable start of the name.
    """
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def consume_deadline(count: int) -> float:
    """Seconds a consume phase may take before it is declared stuck.

    Args:
        count: Messages to consume.
    """
    return 30.0 + count / 100


async def run_windowed(operation: Callable[[int], Awaitable[object]], count: int, window: int) -> float:
    """Run ``operation(0..count-1)`` with at most ``window`` in flight; return seconds taken.

    ``window=1`` awaits each operation before starting the next. Errors propagate.

    Args:
        operation: Coroutine function taking the message index.
        count: How many operations.
        window: Maximum concurrent operations.
    """
    started = time.perf_counter()
    if window <= 1:
        for index in range(count):
            await operation(index)
        return time.perf_counter() - started
    pending: set[asyncio.Future[object]] = set()
    try:
        for index in range(count):
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    future.result()
            pending.add(asyncio.ensure_future(operation(index)))
        for future in asyncio.as_completed(pending):
            await future
    finally:
        for future in pending:
            future.cancel()
    return time.perf_counter() - started


async def run_pipelined(
    send: Callable[[int], Awaitable[Awaitable[object]]], count: int, window: int, *, chunks: bool = False
) -> float:
    """Send ``0..count-1`` in order with at most ``window`` unanswered; return seconds until the last answer.

    ``send(index)`` returns once the message is on its way, with an awaitable
    of its answer (a future, or a task where the client only offers a
    coroutine). A sliding window awaits the oldest answer when full (confirms
    and PubAcks of one channel or connection come in order): O(1) per
    message, where :func:`run_windowed`'s ``asyncio.wait`` adds and removes a
    callback on every pending operation each time. ``chunks=True`` instead
    sends ``window`` messages and awaits all their answers before the next
    ``window``. Errors propagate (the answers still pending are cancelled).

    Args:
        send: Coroutine function taking the message index.
        count: How many messages.
        window: Most answers outstanding at once.
        chunks: Wait for a whole window's answers before sending on.
    """
    started = time.perf_counter()
    pending: deque[Awaitable[object]] = deque()
    try:
        for index in range(count):
            if len(pending) >= window:
                if chunks:
                    await asyncio.gather(*pending)
                    pending.clear()
                else:
                    await pending.popleft()
            pending.append(await send(index))
        while pending:
            await pending.popleft()
    finally:
        for answer in pending:
            if isinstance(answer, asyncio.Future):
                answer.cancel()
    return time.perf_counter() - started


class FirstDeliveryClock:
    """Times a consume phase from its first delivery to the moment it is stopped."""

    def __init__(self) -> None:
        self._first: float | None = None

    def tick(self) -> None:
        """Record a delivery (only the first one matters)."""
        if self._first is None:
            self._first = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the first delivery (0 if there was none)."""
        return 0.0 if self._first is None else time.perf_counter() - self._first


# --- RabbitMQ (aiormq: the AMQP client under Conveyor's transport) ---------------------

AmqpMessage = tuple[bytes, Any]
"""A body and its ``pamqp.commands.Basic.Properties``, ready for ``basic_publish``."""


def amqp_messages(count: int, body: bytes = PAYLOAD) -> list[AmqpMessage]:
    """``count`` persistent messages of ``body``, each with its own ``message_id``.

    Args:
        count: How many.
        body: Their body (default 1 KiB).
    """
    from pamqp.commands import Basic

    return [(body, Basic.Properties(delivery_mode=2, message_id=uuid.uuid4().hex)) for _ in range(count)]


@contextlib.asynccontextmanager
async def rabbit_connection(url: str) -> AsyncIterator[Any]:
    """An aiormq connection, closed afterwards.

    Args:
        url: AMQP URL.
    """
    import aiormq

    connection = await aiormq.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def rabbit_queue(url: str) -> AsyncIterator[tuple[Any, str]]:
    """Connect with aiormq and declare a fresh durable queue; delete both afterwards.

    Args:
        url: AMQP URL.

    Yields:
        ``(connection, queue_name)``.
    """
    async with rabbit_connection(url) as connection:
        name = unique_name("bench-raw")
        channel = await connection.channel()
        await channel.queue_declare(name, durable=True)
        try:
            yield connection, name
        finally:
            await channel.queue_delete(name)
            await channel.close()


async def rabbit_publish(
    connection: Any,
    routing_key: str,
    messages: Sequence[AmqpMessage],
    window: int = 1,
    *,
    exchange: str = "",
    mandatory: bool = False,
    chunks: bool = False,
) -> float:
    """Publish ``messages`` on a channel with publisher confirms, ``window`` awaiting their confirm; return seconds.

    Each publish is a task of aiormq's ``basic_publish``, which returns once
    its confirm arrived (a nack or a return raises); see :func:`run_pipelined`
    for the window.

    Args:
        connection: An aiormq connection.
        routing_key: The routing key (the queue's name for the default exchange).
        messages: Bodies and properties, sent in order.
        window: Publishes awaiting their confirm at once (1 = one at a time).
        exchange: The exchange (default: the default exchange).
        mandatory: Ask the broker to return a message no queue takes.
        chunks: Send ``window`` and wait for all their confirms, then the next
            ``window`` (else a sliding window).
    """
    channel = await connection.channel(publisher_confirms=True)
    try:
        publish = channel.basic_publish

        async def send(index: int) -> Awaitable[object]:
            body, properties = messages[index]
            task: asyncio.Future[object] = asyncio.ensure_future(
                publish(body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory)
            )
            return task

        return await run_pipelined(send, len(messages), window, chunks=chunks)
    finally:
        await channel.close()


async def rabbit_consume(connection: Any, queue: str, count: int, prefetch: int = DEFAULT_CONSUME_BATCH) -> float:
    """Consume ``count`` messages with aiormq's ``basic_consume`` and ``prefetch``, ``basic_ack`` each; return seconds.

    Args:
        connection: An aiormq connection.
        queue: Queue holding at least ``count`` messages.
        count: Messages to consume.
        prefetch: Channel QoS prefetch count.

    Returns:
        Seconds from the first delivery to the last ack.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.basic_qos(prefetch_count=prefetch)
        clock, received = FirstDeliveryClock(), 0
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack = channel.basic_ack

        async def on_message(message: Any) -> None:
            nonlocal received
            clock.tick()
            await ack(message.delivery_tag)
            received += 1
            if received == count:
                done.set_result(None)

        consumer = await channel.basic_consume(queue, on_message, no_ack=False)
        await asyncio.wait_for(done, consume_deadline(count))
        seconds = clock.elapsed()
        await channel.basic_cancel(consumer.consumer_tag)
        return seconds
    finally:
        await channel.close()


async def bench_rabbit(url: str, count: int, window: int, prefetch: int) -> list[Result]:
    """Measure RabbitMQ publish (sequential and windowed) and consume.

    Args:
        url: AMQP URL.
        count: Messages per phase.
        window: Concurrent publishes in the windowed phase.
        prefetch: Consumer prefetch.
    """
    async with rabbit_queue(url) as (connection, queue):
        sequential = await rabbit_publish(connection, queue, amqp_messages(count), window=1)
        consume = await rabbit_consume(connection, queue, count, prefetch)
        windowed = await rabbit_publish(connection, queue, amqp_messages(count), window=window)
    return [
        Result("rabbit", "publish", "confirm each, sequential", count, sequential),
        Result("rabbit", "publish", f"confirm each, window {window}", count, windowed),
        Result("rabbit", "consume", f"prefetch {prefetch}, ack each", count, consume),
    ]


# --- NATS JetStream (nats-py) -----------------------------------------------------------

NatsMessage = tuple[bytes, dict[str, str] | None]
"""A payload and its headers (``Nats-Msg-Id`` among them: the stream deduplicates by it)."""
NatsPublisher = Literal["publish_async", "requests"]
NATS_PUBLISHERS: tuple[NatsPublisher, ...] = get_args(NatsPublisher)


def nats_messages(count: int, body: bytes = PAYLOAD) -> list[NatsMessage]:
    """``count`` messages of ``body``, each with its own ``Nats-Msg-Id``.

    Args:
        count: How many.
        body: Their payload (default 1 KiB).
    """
    return [(body, {"Nats-Msg-Id": uuid.uuid4().hex}) for _ in range(count)]


@contextlib.asynccontextmanager
async def nats_stream(url: str) -> AsyncIterator[tuple[Any, str, str]]:
    """Connect to NATS and create a fresh JetStream stream; delete both afterwards.

    Args:
        url: NATS URL.

    Yields:
        ``(jetstream_context, stream_name, subject)``.
    """
    import nats

    client = await nats.connect(url)
    name = unique_name("bench-raw")
    subject = f"{name}.events"
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(name=name, subjects=[subject])
        yield jetstream, name, subject
        await jetstream.delete_stream(name)
    finally:
        await client.close()


async def nats_publish(
    jetstream: Any,
    subject: str,
    messages: Sequence[NatsMessage],
    window: int = 1,
    publisher: NatsPublisher = "requests",
    *,
    chunks: bool = False,
) -> float:
    """Publish ``messages`` to JetStream, ``window`` awaiting their PubAck; return seconds.

    ``window=1`` awaits each ``js.publish``. Otherwise, pipelined on the one
    connection: ``"publish_async"`` is nats-py's ``js.publish_async`` (one
    future per message); ``"requests"`` sends each message with a reply
    subject ``<inbox>.<n>`` and matches the PubAcks coming to one subscription on
    ``<inbox>.*`` to their futures, reading each PubAck's JSON for an error (as
    Conveyor's transport does, see ``conveyor.transports.nats_publish``).

    Args:
        jetstream: A ``nats.js.JetStreamContext``.
        subject: Subject captured by the stream.
        messages: Payloads and headers, sent in order.
        window: Publishes awaiting their PubAck at once.
        publisher: The pipelining pattern.
        chunks: Send ``window`` and wait for all their PubAcks, then the next
            ``window`` (else a sliding window; see :func:`run_pipelined`).
    """
    if window <= 1:

        async def each(index: int) -> object:
            body, headers = messages[index]
            return await jetstream.publish(subject, body, headers=headers)

        return await run_windowed(each, len(messages), 1)
    if publisher == "publish_async":
        publish_async = jetstream.publish_async

        async def send_async(index: int) -> Awaitable[object]:
            body, headers = messages[index]
            return await publish_async(subject, body, headers=headers)  # type: ignore[no-any-return]

        return await run_pipelined(send_async, len(messages), window, chunks=chunks)
    return await _publish_requests(jetstream._nc, subject, messages, window, chunks)


def settle_pub_ack(answers: dict[str, asyncio.Future[None]], msg: Any) -> None:
    """Resolve the future in ``answers`` that waits for the PubAck ``msg`` (keyed by its reply subject).

    A PubAck naming an error, or a reply that is no JSON (no stream answered:
    a 503 status with an empty body), fails the future.
    """
    import orjson

    future = answers.pop(msg.subject, None)
    if future is None or future.done():
        return
    try:
        reply = orjson.loads(msg.data)
    except orjson.JSONDecodeError as exc:
        future.set_exception(exc)
        return
    if "error" in reply:
        future.set_exception(RuntimeError(f"JetStream refused a publish: {reply['error']}"))
    else:
        future.set_result(None)


async def _publish_requests(
    client: Any, subject: str, messages: Sequence[NatsMessage], window: int, chunks: bool
) -> float:
    """The ``"requests"`` pattern of :func:`nats_publish`."""

    prefix = f"{client.new_inbox()}."
    answers: dict[str, asyncio.Future[None]] = {}

    async def on_reply(msg: Any) -> None:
        settle_pub_ack(answers, msg)

    replies = await client.subscribe(f"{prefix}*", cb=on_reply)
    loop, publish = asyncio.get_running_loop(), client.publish

    async def send(index: int) -> Awaitable[object]:
        body, headers = messages[index]
        reply = f"{prefix}{index:x}"
        future = answers[reply] = loop.create_future()
        await publish(subject, body, reply=reply, headers=headers)
        return future

    try:
        return await run_pipelined(send, len(messages), window, chunks=chunks)
    finally:
        await replies.unsubscribe()


async def nats_consume(
    jetstream: Any,
    stream: str,
    subject: str,
    count: int,
    batch: int = DEFAULT_CONSUME_BATCH,
    *,
    durable: str | None = None,
) -> float:
    """Consume ``count`` messages with a durable pull subscription, acking each.

    ``ack()`` is fire-and-forget (the server does not confirm it), as usual for consumers.

    Args:
        jetstream: A ``nats.js.JetStreamContext``.
        stream: Stream holding at least ``count`` messages.
        subject: Its subject.
        count: Messages to consume.
        batch: Messages per ``fetch``.
        durable: An existing durable pull consumer to bind to; by default a new
            one is created (and left to the stream's deletion).

    Returns:
        Seconds from the first delivery to the last ack.
    """
    if durable is None:
        subscription = await jetstream.pull_subscribe(subject, durable=f"{stream}-c", stream=stream)
    else:
        subscription = await jetstream.pull_subscribe_bind(durable=durable, stream=stream)
    clock, received = FirstDeliveryClock(), 0
    try:
        async with asyncio.timeout(consume_deadline(count)):
            while received < count:
                messages = await subscription.fetch(min(batch, count - received), timeout=5)
                clock.tick()
                for message in messages:
                    await message.ack()
                received += len(messages)
        return clock.elapsed()
    finally:
        await subscription.unsubscribe()


async def nats_durable(jetstream: Any, stream: str) -> str:
    """Create a durable pull consumer of the whole stream, explicit ack; return its name.

    Args:
        jetstream: A ``nats.js.JetStreamContext``.
        stream: The stream (its deletion deletes the durable).
    """
    from nats.js import api

    name = unique_name("bench-raw")
    await jetstream.add_consumer(stream, api.ConsumerConfig(durable_name=name, ack_policy=api.AckPolicy.EXPLICIT))
    return name


async def nats_pull(client: Any, stream: str, durable: str, count: int, prefetch: int = DEFAULT_CONSUME_BATCH) -> float:
    """Consume ``count`` messages of a durable pull consumer with pull requests kept outstanding, acking each.

    nats-py's core client speaks JetStream's pull API itself, as Conveyor's
    transport does: one subscription on an inbox, a request (``batch``, no
    expiry) to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` for
    ``prefetch`` messages, and another for as many each time half of that was
    acked, so at most ``prefetch`` are requested or unacked at once; each
    message is acked by publishing ``+ACK`` to its reply subject (what
    ``msg.ack()`` sends). Unlike ``fetch``, no delivery waits for a batch to
    finish before the next is asked for.

    Args:
        client: A connected nats-py client.
        stream: The stream.
        durable: Its durable pull consumer, with at least ``count`` messages to deliver.
        count: Messages to consume.
        prefetch: Most messages requested or unacked at once.

    Returns:
        Seconds from the first delivery to the last ack.
    """
    import orjson

    pull, inbox, publish = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", client.new_inbox(), client.publish
    clock, received, freed, requested = FirstDeliveryClock(), 0, 0, min(prefetch, count)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    refill = max(prefetch // 2, 1)

    async def on_message(msg: Any) -> None:
        nonlocal received, freed, requested
        if not msg.reply:  # a status (the request ended), not a message
            if not done.done():
                done.set_exception(RuntimeError(f"pull request ended: {msg.headers}"))
            return
        clock.tick()
        await publish(msg.reply, b"+ACK")
        received += 1
        freed += 1
        if received == count and not done.done():
            done.set_result(None)
        elif freed >= refill and requested < count:
            batch, freed = min(freed, count - requested), 0
            requested += batch
            await publish(pull, orjson.dumps({"batch": batch}), reply=inbox)

    subscription = await client.subscribe(inbox, cb=on_message)
    try:
        await publish(pull, orjson.dumps({"batch": requested}), reply=inbox)
        await asyncio.wait_for(done, consume_deadline(count))
        return clock.elapsed()
    finally:
        await subscription.unsubscribe()


async def bench_nats(url: str, count: int, window: int, batch: int) -> list[Result]:
    """Measure JetStream publish (sequential and both pipelined patterns) and pull consume.

    Args:
        url: NATS URL.
        count: Messages per phase.
        window: Publishes in flight in the pipelined phases.
        batch: Messages per fetch.
    """
    async with nats_stream(url) as (jetstream, stream, subject):
        sequential = await nats_publish(jetstream, subject, nats_messages(count), window=1)
        pipelined = {
            publisher: await nats_publish(jetstream, subject, nats_messages(count), window, publisher)
            for publisher in NATS_PUBLISHERS
        }
        fetched = await nats_consume(jetstream, stream, subject, count, batch)
        pulled = await nats_pull(jetstream._nc, stream, await nats_durable(jetstream, stream), count, batch)
    return [
        Result("nats", "publish", "PubAck each, sequential", count, sequential),
        *(Result("nats", "publish", f"{p}, window {window}", count, s) for p, s in pipelined.items()),
        Result("nats", "consume", f"pull fetch({batch}), ack each", count, fetched),
        Result("nats", "consume", f"pull requests ({batch} outstanding), ack each", count, pulled),
    ]


# --- Kafka ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def kafka_bootstrap(target: str | None) -> AsyncIterator[str]:
    """Yield a bootstrap address: ``target``, or a Tansu broker started for the duration.

    Args:
        target: ``host:port`` of an existing broker, or None to start Tansu.
    """
    if target is not None:
        yield target
        return
    from conveyor.testing.servers import TansuBroker

    broker = TansuBroker()
    await asyncio.to_thread(broker.start)
    try:
        yield broker.bootstrap
    finally:
        await asyncio.to_thread(broker.stop)


@contextlib.asynccontextmanager
async def kafka_topic(bootstrap: str, partitions: int = 1) -> AsyncIterator[str]:
    """Create a fresh topic; delete it afterwards.

    Args:
        bootstrap: Kafka bootstrap address.
        partitions: Partition count.

    Yields:
        The topic name.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    name = unique_name("bench-raw")
    try:
        await admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


async def kafka_publish(bootstrap: str, topic: str, count: int, batch: int = 1) -> float:
    """Publish ``count`` 1 KiB records with ``acks="all"``; return seconds.

    ``batch=1`` uses ``send_and_wait`` per record; otherwise ``send`` queues records and the
    delivery futures are gathered every ``batch`` records. Idempotence stays off (Tansu
    rejects idempotent producers).

    Args:
        bootstrap: Kafka bootstrap address.
        topic: Target topic.
        count: Records to publish.
        batch: Records whose delivery futures are awaited together.
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        started = time.perf_counter()
        if batch <= 1:
            for _ in range(count):
                await producer.send_and_wait(topic, PAYLOAD)
        else:
            futures: list[asyncio.Future[Any]] = []
            for _ in range(count):
                futures.append(await producer.send(topic, PAYLOAD))
                if len(futures) >= batch:
                    await asyncio.gather(*futures)
                    futures.clear()
            await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def kafka_consume(
    bootstrap: str,
    topic: str,
    count: int,
    commit: KafkaCommit = "message",
    batch: int = DEFAULT_CONSUME_BATCH,
) -> float:
    """Consume ``count`` records in a new consumer group with manual commits.

    Args:
        bootstrap: Kafka bootstrap address.
        topic: Topic holding at least ``count`` records.
        count: Records to consume.
        commit: ``"message"`` commits after every record, ``"batch"`` once per ``getmany``.
        batch: ``max_records`` per ``getmany``.

    Returns:
        Seconds from the first delivery to the last commit.
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=unique_name("bench-raw-group"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    clock, received = FirstDeliveryClock(), 0
    try:
        async with asyncio.timeout(consume_deadline(count)):
            while received < count:
                records = await consumer.getmany(timeout_ms=1000, max_records=batch)
                if not records:
                    continue
                clock.tick()
                offsets: dict[TopicPartition, int] = {}
                for partition, messages in records.items():
                    for message in messages[: count - received]:
                        received += 1
                        offsets[partition] = message.offset + 1
                        if commit == "message":
                            await consumer.commit({partition: message.offset + 1})
                if commit == "batch" and offsets:
                    await consumer.commit(offsets)
        return clock.elapsed()
    finally:
        await consumer.stop()


async def bench_kafka(target: str | None, count: int, batch: int, consume_batch: int) -> list[Result]:
    """Measure Kafka publish (send_and_wait, batched futures) and consume (two commit styles).

    Args:
        target: ``host:port`` of a broker, or None to start a Tansu broker.
        count: Records per phase.
        batch: Futures gathered together in the batched publish.
        consume_batch: ``max_records`` per ``getmany``.
    """
    async with kafka_bootstrap(target) as bootstrap, kafka_topic(bootstrap) as topic:
        each = await kafka_publish(bootstrap, topic, count, batch=1)
        batched = await kafka_publish(bootstrap, topic, count, batch=batch)
        per_message = await kafka_consume(bootstrap, topic, count, "message", consume_batch)
        per_batch = await kafka_consume(bootstrap, topic, count, "batch", consume_batch)
    return [
        Result("kafka", "publish", 'acks="all", send_and_wait each', count, each),
        Result("kafka", "publish", f'acks="all", send + gather per {batch}', count, batched),
        Result("kafka", "consume", f"group, commit each (getmany {consume_batch})", count, per_message),
        Result("kafka", "consume", f"group, commit per getmany ({consume_batch})", count, per_batch),
    ]


# --- Importable one-number entry points -------------------------------------------------


async def raw_publish_rate(
    broker: Broker, count: int, *, window: int = DEFAULT_WINDOW, target: str | None = None
) -> float:
    """Publish ``count`` acknowledged 1 KiB messages with the raw client; return messages/s.

    Args:
        broker: ``"rabbit"``, ``"nats"`` or ``"kafka"``.
        count: Messages to publish.
        window: In-flight publishes (rabbit, nats) or futures gathered together (kafka);
            1 awaits each publish's acknowledgement before the next.
        target: Broker URL (AMQP/NATS) or Kafka ``host:port``; default: local services,
            and a Tansu broker started for the call for Kafka.
    """
    if broker == "rabbit":
        async with rabbit_queue(target or DEFAULT_RABBIT_URL) as (connection, queue):
            seconds = await rabbit_publish(connection, queue, amqp_messages(count), window)
    elif broker == "nats":
        async with nats_stream(target or DEFAULT_NATS_URL) as (jetstream, _, subject):
            seconds = await nats_publish(jetstream, subject, nats_messages(count), window)
    else:
        async with kafka_bootstrap(target) as bootstrap, kafka_topic(bootstrap) as topic:
            seconds = await kafka_publish(bootstrap, topic, count, window)
    return count / seconds


async def raw_consume_rate(
    broker: Broker,
    count: int,
    *,
    batch: int = DEFAULT_CONSUME_BATCH,
    kafka_commit: KafkaCommit = "message",
    target: str | None = None,
) -> float:
    """Consume ``count`` pre-published 1 KiB messages, acking each; return messages/s.

    The backlog is published first (windowed, not timed).

    Args:
        broker: ``"rabbit"``, ``"nats"`` or ``"kafka"``.
        count: Messages to consume.
        batch: Prefetch (rabbit), most requested or unacked (nats) or ``max_records`` (kafka).
        kafka_commit: Commit after every record or once per batch.
        target: As for :func:`raw_publish_rate`.
    """
    if broker == "rabbit":
        async with rabbit_queue(target or DEFAULT_RABBIT_URL) as (connection, queue):
            await rabbit_publish(connection, queue, amqp_messages(count), DEFAULT_WINDOW)
            seconds = await rabbit_consume(connection, queue, count, batch)
    elif broker == "nats":
        async with nats_stream(target or DEFAULT_NATS_URL) as (jetstream, stream, subject):
            await nats_publish(jetstream, subject, nats_messages(count), DEFAULT_WINDOW)
            seconds = await nats_pull(jetstream._nc, stream, await nats_durable(jetstream, stream), count, batch)
    else:
        async with kafka_bootstrap(target) as bootstrap, kafka_topic(bootstrap) as topic:
            await kafka_publish(bootstrap, topic, count, DEFAULT_KAFKA_BATCH)
            seconds = await kafka_consume(bootstrap, topic, count, kafka_commit, batch)
    return count / seconds


# --- Command line -----------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    """Render results as an aligned text table.

    Args:
        results: Measured phases.
    """
    header = ("broker", "operation", "variant", "messages", "seconds", "msg/s")
    rows = [(r.broker, r.operation, r.variant, str(r.count), f"{r.seconds:.3f}", f"{r.rate:,.0f}") for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = {3, 4, 5}

    def line(row: Sequence[str]) -> str:
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def parse_brokers(value: str) -> list[Broker]:
    """Parse ``--brokers``: a comma-separated subset of rabbit, nats, kafka (or ``all``).

    Args:
        value: The option's value.

    Raises:
        argparse.ArgumentTypeError: An unknown broker name.
    """
    if value.strip() == "all":
        return list(BROKERS)
    chosen: list[Broker] = []
    for name in (part.strip() for part in value.split(",") if part.strip()):
        if name not in BROKERS:
            raise argparse.ArgumentTypeError(f"unknown broker {name!r}; choose from {BROKERS}")
        chosen.append(name)  # checked against BROKERS above
    return chosen


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=5000, help="messages per phase (5000)")
    parser.add_argument("--brokers", type=parse_brokers, default=list(BROKERS), help="e.g. rabbit,nats (all)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="concurrent publishes (100)")
    parser.add_argument(
        "--kafka-batch",
        type=int,
        default=DEFAULT_KAFKA_BATCH,
        help="Kafka futures gathered together (1000)",
    )
    parser.add_argument(
        "--consume-batch",
        type=int,
        default=DEFAULT_CONSUME_BATCH,
        help="prefetch / fetch size / max_records (100)",
    )
    parser.add_argument("--rabbit-url", default=DEFAULT_RABBIT_URL)
    parser.add_argument("--nats-url", default=DEFAULT_NATS_URL)
    parser.add_argument("--kafka-bootstrap", default=None, help="host:port of a Kafka broker (default: Tansu)")
    return parser


async def run(args: argparse.Namespace) -> list[Result]:
    """Run the selected benchmarks one broker after another.

    Args:
        args: Parsed command line.
    """
    results: list[Result] = []
    for broker in args.brokers:
        if broker == "rabbit":
            results += await bench_rabbit(args.rabbit_url, args.count, args.window, args.consume_batch)
        elif broker == "nats":
            results += await bench_nats(args.nats_url, args.count, args.window, args.consume_batch)
        else:
            results += await bench_kafka(args.kafka_bootstrap, args.count, args.kafka_batch, args.consume_batch)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run the benchmarks and print the table.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    results = asyncio.run(run(args))
    print(f"{args.count} messages of {len(PAYLOAD)} bytes per phase, one process")
    print(format_table(results))


if __name__ == "__main__":
    main()
