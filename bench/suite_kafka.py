"""Kafka through Conveyor next to raw aiokafka, on one Tansu broker shared by the rows.

Rows (1 KiB CloudEvents records; rates in messages/s):

* **kafka consume (1 msg/handler call)**: a no-op single-message handler run
  by the real runtime ``Worker`` over a backlog published beforehand, from the
  first to the last handled record, against the raw group consumer that
  commits once per ``getmany(max_records=100)``
  (``raw_clients.kafka_consume(commit="batch")``; larger batches were no
  faster in a smoke run: the fetches dominate). Both sides read the same
  records, published beforehand through the transport (binary-mode
  CloudEvents: the same value bytes and headers).
* **kafka consume, transport alone**: the same backlog through ``KafkaTransport``
  with a callback that acks at once (no runtime): the transport's own cost.
* **kafka consume CPU per record**: the same, measured as this process's CPU
  time per record (the broker's excluded): steadier than rates on a shared machine.
* **kafka publish_many(1000)**: what a user does: ``conveyor.Publisher.publish_many``
  of :data:`WINDOW` events at a time, each a new CloudEvent (id, time,
  headers) built from the same dict. Raw: aiokafka's fastest producing
  pattern (:func:`raw_publish`, ``create_batch()`` + ``send_batch()``; in a
  smoke run it beat ``send()`` + gathering the futures and ``send()`` +
  ``flush()``), :data:`WINDOW` records per round, with the producer settings
  of Conveyor's Kafka transport and the bytes of one record as Conveyor
  produces it (value and headers, no key) sent over and over.
* **kafka publish, 1,000 calls in flight**: :data:`WINDOW` concurrent
  ``Publisher.publish`` calls at a time (``asyncio.gather``) against the same
  raw rounds of :data:`WINDOW` records in flight: a publish path that
  collapses under concurrency shows here.

Run alone::

    .venv/bin/python -m bench.suite_kafka --runs 3
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from unittest import mock

from conveyor import Publisher, envelope, ports, registry
from conveyor.envelope import WireMessage
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.transports import kafka_delivery
from conveyor.transports.kafka import KafkaOptions, KafkaTransport

from bench import harness, raw_clients

CONSUME_COUNT = 20_000
PUBLISH_COUNT = 30_000
CONCURRENT_COUNT = 20_000
WINDOW = 1_000
BATCH = 500  # the batch handler row's batch size
RAW_GETMANY = 100  # max_records of the raw consumer's getmany, committed after each
CONCURRENCY = 16  # the Worker's default per-handler concurrency
PARTITIONS = 1  # the raw topics' partition count (raw_clients.kafka_topic); Conveyor's topics get the same
DATA = {"order_id": "o-1", "note": "x" * 980}
SOURCE = "bench"  # the CloudEvents source of every record, on both sides
# Short group timeouts: Tansu holds a JoinGroup about half the session timeout (set-up only, not timed).
OPTIONS = f"idempotence=0&partitions={PARTITIONS}&session_timeout_ms=2000&heartbeat_interval_ms=400"


def wire_messages(topic: str, count: int) -> list[WireMessage]:
    """``count`` binary-mode CloudEvents of ~1 KiB for ``topic``."""
    return [
        envelope.to_binary(envelope.create(topic, DATA, source=SOURCE), envelope.KAFKA_PREFIX) for _ in range(count)
    ]


async def publish_backlog(transport: KafkaTransport, topic: str, count: int) -> None:
    """Publish ``count`` records through the transport (not timed)."""
    messages = wire_messages(topic, count)
    for start in range(0, count, WINDOW):
        results = await transport.publish_many([(topic, m) for m in messages[start : start + WINDOW]])
        if failed := [r for r in results if r is not None]:
            raise RuntimeError(f"backlog publish failed: {failed[0]!r}")


class KafkaRows:
    """The rows' measures, on one broker.

    Args:
        bootstrap: ``host:port`` of the broker.
    """

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.url = f"kafka://{bootstrap}?{OPTIONS}"
        self.options = KafkaOptions.from_query(OPTIONS)

    async def _transport(self) -> KafkaTransport:
        transport = KafkaTransport(self.url)
        await transport.connect()
        return transport

    async def _raw_producer(self) -> Any:
        """A started ``AIOKafkaProducer`` with the settings ``KafkaTransport.connect`` gives its own."""
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=bool(self.options.idempotence),
            request_timeout_ms=self.options.request_timeout_ms,
            linger_ms=self.options.linger_ms,
            max_batch_size=self.options.max_batch_size,
        )  # no compression on either side
        await producer.start()
        return producer

    # -- consume -------------------------------------------------------------------

    async def raw_consume(self) -> float:
        """The raw group loop, one commit per ``getmany(100)``: msg/s."""
        return (await self._raw_consume())[0]

    async def conveyor_consume(self) -> float:
        """A no-op single-message handler through the runtime ``Worker``: msg/s."""
        return (await self._conveyor_consume())[0]

    async def transport_consume(self) -> float:
        """The transport alone: a delivery callback that acks at once (no runtime), msg/s."""
        transport = await self._transport()
        topic = unique("bench")
        subscription = ports.Subscription(name=unique("bench"), topic=topic, prefetch=CONCURRENCY * 2)
        stamps: list[float] = []
        done = asyncio.Event()

        async def ack(delivery: ports.Delivery) -> None:
            await delivery.ack()
            stamps.append(time.perf_counter())
            if len(stamps) == CONSUME_COUNT:
                done.set()

        try:
            await transport.declare([topic], [subscription])
            await publish_backlog(transport, topic, CONSUME_COUNT)
            await transport.subscribe(subscription, ack)
            await asyncio.wait_for(done.wait(), timeout=raw_clients.consume_deadline(CONSUME_COUNT))
        finally:
            await transport.close()
        return (CONSUME_COUNT - 1) / (stamps[-1] - stamps[0])

    async def raw_consume_cpu(self) -> float:
        """CPU µs of this process per record, in the raw loop."""
        return (await self._raw_consume())[1]

    async def conveyor_consume_cpu(self) -> float:
        """CPU µs of this process per record, through the ``Worker``."""
        return (await self._conveyor_consume())[1]

    async def _raw_consume(self) -> tuple[float, float]:
        async with raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic:
            transport = await self._transport()
            try:
                await publish_backlog(transport, topic, CONSUME_COUNT)
            finally:
                await transport.close()
            with mock.patch.object(raw_clients, "FirstDeliveryClock", _CpuClock):
                seconds = await raw_clients.kafka_consume(self.bootstrap, topic, CONSUME_COUNT, "batch", RAW_GETMANY)
        return CONSUME_COUNT / seconds, _CpuClock.last * 1e6 / CONSUME_COUNT

    async def _conveyor_consume(self) -> tuple[float, float]:
        transport = await self._transport()
        topic, name = unique("bench"), unique("bench")
        stamps: list[float] = []
        cpu: list[float] = []
        done = asyncio.Event()

        @registry.on(topic, name=name, concurrency=CONCURRENCY)
        async def noop(payload: bytes) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) in (1, CONSUME_COUNT):
                cpu.append(time.process_time())
            if len(stamps) == CONSUME_COUNT:
                done.set()

        await _drain_backlog(transport, noop, topic, done)
        return (CONSUME_COUNT - 1) / (stamps[-1] - stamps[0]), (cpu[1] - cpu[0]) * 1e6 / (CONSUME_COUNT - 1)

    async def conveyor_batch_consume(self) -> float:
        """A no-op batch handler (``@on(..., batch=BATCH)``) through the runtime ``Worker``: msg/s."""
        transport = await self._transport()
        topic, name = unique("bench"), unique("bench")
        stamps: list[float] = []
        seen = [0]
        done = asyncio.Event()

        @registry.on(topic, name=name, batch=BATCH, batch_wait=0.01)
        async def noop(payloads: list[bytes]) -> None:
            if not stamps:
                stamps.append(time.perf_counter())
            seen[0] += len(payloads)
            if seen[0] >= CONSUME_COUNT:
                stamps.append(time.perf_counter())
                done.set()

        await _drain_backlog(transport, noop, topic, done)
        return CONSUME_COUNT / (stamps[-1] - stamps[0])

    # -- publish -------------------------------------------------------------------

    async def raw_publish_many(self) -> float:
        """:func:`raw_publish` of :data:`PUBLISH_COUNT` records, :data:`WINDOW` per round: msg/s."""
        return await self._raw_publish(PUBLISH_COUNT)

    async def raw_in_flight(self) -> float:
        """:func:`raw_publish` of :data:`CONCURRENT_COUNT` records, :data:`WINDOW` per round: msg/s."""
        return await self._raw_publish(CONCURRENT_COUNT)

    async def _raw_publish(self, count: int) -> float:
        async with raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic:
            producer = await self._raw_producer()
            try:
                record = conveyor_record(topic)
                await raw_publish(producer, topic, record, 1)  # metadata, connection: not timed
                started = time.perf_counter()
                await raw_publish(producer, topic, record, count)
                return count / (time.perf_counter() - started)
            finally:
                await producer.stop()

    async def conveyor_publish_many(self) -> float:
        """``Publisher.publish_many`` of :data:`WINDOW` events at a time: msg/s."""

        async def rounds(publisher: Publisher, topic: str) -> None:
            for start in range(0, PUBLISH_COUNT, WINDOW):
                await publisher.publish_many(topic, [DATA] * min(WINDOW, PUBLISH_COUNT - start))

        return PUBLISH_COUNT / await self._conveyor_publish(rounds)

    async def conveyor_in_flight(self) -> float:
        """:data:`WINDOW` concurrent ``Publisher.publish`` calls at a time (``asyncio.gather``): msg/s."""

        async def rounds(publisher: Publisher, topic: str) -> None:
            for start in range(0, CONCURRENT_COUNT, WINDOW):
                calls = min(WINDOW, CONCURRENT_COUNT - start)
                await asyncio.gather(*(publisher.publish(topic, DATA) for _ in range(calls)))

        return CONCURRENT_COUNT / await self._conveyor_publish(rounds)

    async def _conveyor_publish(self, rounds: Callable[[Publisher, str], Awaitable[None]]) -> float:
        """Seconds ``rounds`` takes on a connected ``Publisher`` and a fresh topic."""
        async with (
            raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic,
            Publisher(self.url, source=SOURCE) as publisher,
        ):
            await publisher.publish(topic, DATA)  # the topic check, metadata, connection: not timed
            started = time.perf_counter()
            await rounds(publisher, topic)
            return time.perf_counter() - started


Record = tuple[bytes, list[tuple[str, bytes]]]
"""A Kafka record's value and headers (no key)."""


def conveyor_record(topic: str) -> Record:
    """The value and headers of one record as ``Publisher.publish(topic, DATA)`` produces it.

    The envelope is built as the ``Publisher`` builds it, encoded as the Kafka
    transport encodes it (binary mode, ``ce_*`` headers, ``conveyor-message-id``).
    """
    wire = envelope.to_binary(envelope.create(topic, DATA, source=SOURCE), envelope.KAFKA_PREFIX)
    return wire.body, kafka_delivery.record_headers(wire)


async def raw_publish(producer: Any, topic: str, record: Record, count: int) -> None:
    """Send ``record`` ``count`` times, :data:`WINDOW` in flight per round: aiokafka's fastest way.

    Each round appends :data:`WINDOW` records to ``create_batch()`` batches
    (a batch is full at the producer's ``max_batch_size``), hands each to
    ``send_batch()`` (the topic's partitions in turn: the record has no key)
    and waits for every batch's acknowledgement (``acks="all"``).
    """
    value, headers = record
    batches = 0
    for start in range(0, count, WINDOW):
        delivered, batch = [], producer.create_batch()
        for _ in range(min(WINDOW, count - start)):
            while batch.append(key=None, value=value, timestamp=None, headers=headers) is None:  # full
                delivered.append(await producer.send_batch(batch, topic, partition=batches % PARTITIONS))
                batches, batch = batches + 1, producer.create_batch()
        delivered.append(await producer.send_batch(batch, topic, partition=batches % PARTITIONS))
        batches += 1
        await asyncio.gather(*delivered)


async def _drain_backlog(transport: KafkaTransport, handler: Any, topic: str, done: asyncio.Event) -> None:
    """Publish the backlog for ``handler``'s topic, run a ``Worker`` until ``done``, then close the transport."""
    worker = Worker(registry.Registry.of(handler).handlers, transport, source=SOURCE, concurrency=CONCURRENCY)
    try:
        await worker.declare()
        await publish_backlog(transport, topic, CONSUME_COUNT)
        await worker.start()
        await asyncio.wait_for(done.wait(), timeout=raw_clients.consume_deadline(CONSUME_COUNT))
        await worker.stop(5)
    finally:
        await transport.close()


class _CpuClock(raw_clients.FirstDeliveryClock):
    """``FirstDeliveryClock`` that also takes this process's CPU time from the first delivery to ``elapsed()``."""

    last = 0.0  # CPU seconds of the latest measured phase

    def tick(self) -> None:
        if self._first is None:
            self._cpu = time.process_time()
        super().tick()

    def elapsed(self) -> float:
        _CpuClock.last = time.process_time() - self._cpu
        return super().elapsed()


@contextlib.asynccontextmanager
async def suite() -> AsyncIterator[Sequence[harness.Row]]:
    """Start one Tansu broker and yield the Kafka rows."""
    async with raw_clients.kafka_bootstrap(None) as bootstrap:
        rows = KafkaRows(bootstrap)
        options = rows.options
        raw_consume = (
            f"aiokafka group consumer (auto-commit off), getmany(max_records={RAW_GETMANY}), "
            "one commit of the batch's offsets after each"
        )
        raw_pattern = (
            f"create_batch() + send_batch(), {WINDOW} records in flight per round, the bytes of one Conveyor record "
            f"(value, headers) each time; both: acks=all, linger_ms={options.linger_ms}, "
            f"max_batch_size={options.max_batch_size}, no compression, idempotence {options.idempotence}"
        )
        yield [
            harness.Row(
                "kafka consume (1 msg/handler call)",
                rows.raw_consume,
                rows.conveyor_consume,
                goal=0.5,
                note=f"{CONSUME_COUNT:,} records, {PARTITIONS} partition(s), published beforehand by the transport "
                f"(the same bytes and headers for both sides); raw: {raw_consume}; Conveyor: Worker, no-op handler, "
                f"concurrency {CONCURRENCY}",
            ),
            harness.Row(
                f"kafka consume, batch handler (batch={BATCH})",
                rows.raw_consume,
                rows.conveyor_batch_consume,
                goal=0.7,
                note=f"the consume row with `@on(..., batch={BATCH})`: one call per up to {BATCH} records, each "
                f"record acked on its own; raw: {raw_consume}",
            ),
            harness.Row(
                "kafka consume, transport alone",
                rows.raw_consume,
                rows.transport_consume,
                goal=0.5,
                note="the consume row without the runtime: a callback acking each delivery at once (prefetch "
                f"{CONCURRENCY * 2}, as the Worker sets it): what the Kafka transport itself costs; raw: {raw_consume}",
            ),
            harness.Row(
                "kafka consume CPU per record",
                rows.raw_consume_cpu,
                rows.conveyor_consume_cpu,
                goal=0.35,
                unit="µs CPU",
                higher_is_better=False,
                note="the consume row's work; CPU time of the consuming process (not the broker's) from the first "
                f"to the last record: the rate it allows on an idle machine (this one is shared); raw: {raw_consume}",
            ),
            harness.Row(
                f"kafka publish_many({WINDOW})",
                rows.raw_publish_many,
                rows.conveyor_publish_many,
                goal=0.9,
                note=f"{PUBLISH_COUNT:,} records; Conveyor: Publisher.publish_many of {WINDOW} events at a time, a "
                f"new CloudEvent each; raw: {raw_pattern}",
            ),
            harness.Row(
                f"kafka publish, {WINDOW:,} calls in flight",
                rows.raw_in_flight,
                rows.conveyor_in_flight,
                goal=0.9,
                note=f"{CONCURRENT_COUNT:,} records; Conveyor: {WINDOW} concurrent Publisher.publish calls at a time "
                f"(asyncio.gather); raw: {raw_pattern}",
            ),
        ]


if __name__ == "__main__":
    harness.main_for(suite)
