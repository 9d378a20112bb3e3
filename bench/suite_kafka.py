"""Kafka through Conveyor next to raw aiokafka, on one Tansu broker shared by the rows.

Rows (1 KiB CloudEvents records; rates in messages/s):

* **kafka consume (1 msg/handler call)**: a no-op single-message handler run
  by the real runtime ``Worker`` over a backlog published beforehand, from the
  first to the last handled record, against the raw loop that commits once per
  ``getmany(100)`` (``raw_clients.kafka_consume(commit="batch")``).
* **kafka consume, transport alone**: the same backlog through ``KafkaTransport``
  with a callback that acks at once (no runtime): the transport's own cost.
* **kafka consume CPU per record**: the same, measured as this process's CPU
  time per record (the broker's excluded): steadier than rates on a shared machine.
* **kafka publish pipelined**: ``KafkaTransport.publish_many`` in chunks of
  :data:`WINDOW` against raw ``send`` + ``gather`` per :data:`WINDOW` records,
  the same records (key, body, headers) and the same producer settings
  (``acks="all"``, ``linger_ms``/``max_batch_size`` of :class:`KafkaOptions`).
* **kafka publish, 1,000 concurrent**: 1,000 publishes always in flight
  (``KafkaTransport.publish`` each) against 1,000 raw ``send`` + ``await``
  always in flight, same producer settings: a publish path that collapses under
  concurrency shows here.

Run alone::

    .venv/bin/python -m bench.suite_kafka --runs 3
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from unittest import mock

from conveyor import envelope, ports, registry
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
CONCURRENCY = 16  # the Worker's default per-handler concurrency
PARTITIONS = 1  # the raw topics' partition count (raw_clients.kafka_topic); Conveyor's topics get the same
DATA = {"order_id": "o-1", "note": "x" * 980}
# Short group timeouts: Tansu holds a JoinGroup about half the session timeout (set-up only, not timed).
OPTIONS = f"idempotence=0&partitions={PARTITIONS}&session_timeout_ms=2000&heartbeat_interval_ms=400"


def wire_messages(topic: str, count: int) -> list[WireMessage]:
    """``count`` binary-mode CloudEvents of ~1 KiB for ``topic``."""
    return [
        envelope.to_binary(envelope.create(topic, DATA, source="bench"), envelope.KAFKA_PREFIX) for _ in range(count)
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
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=False,
            linger_ms=self.options.linger_ms,
            max_batch_size=self.options.max_batch_size,
        )
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
                seconds = await raw_clients.kafka_consume(self.bootstrap, topic, CONSUME_COUNT, "batch", 100)
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

    async def raw_pipelined(self) -> float:
        """Raw ``send`` of :data:`WINDOW` records, then ``gather`` of their futures."""
        async with raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic:
            records = _records(wire_messages(topic, PUBLISH_COUNT))
            producer = await self._raw_producer()
            try:
                started = time.perf_counter()
                for start in range(0, PUBLISH_COUNT, WINDOW):
                    futures = [
                        await producer.send(topic, value, key=key, headers=headers)
                        for key, value, headers in records[start : start + WINDOW]
                    ]
                    await asyncio.gather(*futures)
                return PUBLISH_COUNT / (time.perf_counter() - started)
            finally:
                await producer.stop()

    async def conveyor_pipelined(self) -> float:
        """``KafkaTransport.publish_many`` of :data:`WINDOW` messages at a time."""
        async with raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic:
            messages = [(topic, m) for m in wire_messages(topic, PUBLISH_COUNT)]
            transport = await self._transport()
            try:
                await transport.declare([topic], [])
                started = time.perf_counter()
                for start in range(0, PUBLISH_COUNT, WINDOW):
                    results = await transport.publish_many(messages[start : start + WINDOW])
                    assert not any(results), results
                return PUBLISH_COUNT / (time.perf_counter() - started)
            finally:
                await transport.close()

    async def raw_concurrent(self) -> float:
        """:data:`WINDOW` raw ``send`` + ``await`` always in flight."""
        async with raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic:
            records = _records(wire_messages(topic, CONCURRENT_COUNT))
            producer = await self._raw_producer()

            async def send(index: int) -> object:
                key, value, headers = records[index]
                return await (await producer.send(topic, value, key=key, headers=headers))

            try:
                return CONCURRENT_COUNT / await raw_clients.run_windowed(send, CONCURRENT_COUNT, WINDOW)
            finally:
                await producer.stop()

    async def conveyor_concurrent(self) -> float:
        """:data:`WINDOW` ``KafkaTransport.publish`` calls always in flight."""
        async with raw_clients.kafka_topic(self.bootstrap, PARTITIONS) as topic:
            messages = wire_messages(topic, CONCURRENT_COUNT)
            transport = await self._transport()
            try:
                await transport.declare([topic], [])
                seconds = await raw_clients.run_windowed(
                    lambda index: transport.publish(topic, messages[index]), CONCURRENT_COUNT, WINDOW
                )
                return CONCURRENT_COUNT / seconds
            finally:
                await transport.close()


async def _drain_backlog(transport: KafkaTransport, handler: Any, topic: str, done: asyncio.Event) -> None:
    """Publish the backlog for ``handler``'s topic, run a ``Worker`` until ``done``, then close the transport."""
    worker = Worker(registry.Registry.of(handler).handlers, transport, source="bench", concurrency=CONCURRENCY)
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


def _records(messages: list[WireMessage]) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """The records Conveyor sends for ``messages``: key, value, headers."""
    return [(m.key.encode() if m.key is not None else None, m.body, kafka_delivery.record_headers(m)) for m in messages]


@contextlib.asynccontextmanager
async def suite() -> AsyncIterator[Sequence[harness.Row]]:
    """Start one Tansu broker and yield the Kafka rows."""
    async with raw_clients.kafka_bootstrap(None) as bootstrap:
        rows = KafkaRows(bootstrap)
        options = rows.options
        producer = f"acks=all, linger_ms={options.linger_ms}, max_batch_size={options.max_batch_size}"
        yield [
            harness.Row(
                "kafka consume (1 msg/handler call)",
                rows.raw_consume,
                rows.conveyor_consume,
                goal=0.35,
                note=f"{CONSUME_COUNT:,} records, {PARTITIONS} partition(s); raw: group loop, commit per "
                f"getmany(100); Conveyor: Worker, no-op handler, concurrency {CONCURRENCY}",
            ),
            harness.Row(
                f"kafka consume, batch handler (batch={BATCH})",
                rows.raw_consume,
                rows.conveyor_batch_consume,
                goal=0.6,
                note=f"the consume row with `@on(..., batch={BATCH})`: one call per up to {BATCH} records, each "
                "record acked on its own",
            ),
            harness.Row(
                "kafka consume, transport alone",
                rows.raw_consume,
                rows.transport_consume,
                goal=0.5,
                note="the consume row without the runtime: a callback acking each delivery at once (prefetch "
                f"{CONCURRENCY * 2}, as the Worker sets it): what the Kafka transport itself costs",
            ),
            harness.Row(
                "kafka consume CPU per record",
                rows.raw_consume_cpu,
                rows.conveyor_consume_cpu,
                goal=0.35,
                unit="µs CPU",
                higher_is_better=False,
                note="the consume row's work; CPU time of the consuming process (not the broker's) from the first "
                "to the last record: the rate it allows on an idle machine (this one is shared)",
            ),
            harness.Row(
                "kafka publish pipelined",
                rows.raw_pipelined,
                rows.conveyor_pipelined,
                goal=0.7,
                note=f"{PUBLISH_COUNT:,} records; raw: send x {WINDOW} + gather; Conveyor: publish_many of "
                f"{WINDOW}; {producer}",
            ),
            harness.Row(
                "kafka publish, 1,000 concurrent",
                rows.raw_concurrent,
                rows.conveyor_concurrent,
                goal=0.7,
                note=f"{CONCURRENT_COUNT:,} records, {WINDOW} in flight; raw: send + await each; "
                f"Conveyor: KafkaTransport.publish each; {producer}",
            ),
        ]


if __name__ == "__main__":
    harness.main_for(suite)
