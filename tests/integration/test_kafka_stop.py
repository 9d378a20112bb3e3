"""Stopping a Kafka worker is bounded, and loses nothing, on Tansu.

Workers of :data:`GROUPS` groups, side by side, are started and stopped again
and again with their prefetch full (handlers held at a gate). In most cycles
the gate opens a moment before the stop: the acks settle every record fetched
and free prefetch room just as the fetch loop is told to stop. Python 3.11's
``asyncio.wait_for`` returns the awaited result instead of raising when a
cancellation arrives as that result comes in; the fetch loop waited for room
that way, lost the stop's cancellation and polled on, and with nothing left
to settle nothing ever cancelled it again: the stop waited for it for ever
(seen in benchmarks at the end of a backlog; here in a group's first cycle). In one
cycle a second member's join rebalances the group while the first stops; in
the last the gate stays shut past the drain deadline, so the stop leaves
records unsettled. Every stop, drain and close must end within :data:`BOUND`, and
one last worker must then handle every record published: a stop that
committed an offset of a record it had not settled would lose that record.
"""

from __future__ import annotations

import asyncio

import pytest
from conveyor import Context, envelope, on, registry
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique, wait_for
from conveyor.transports import kafka_consume
from conveyor.transports.kafka import KafkaTransport

OPTIONS = "idempotence=0&partitions=2&session_timeout_ms=2000&heartbeat_interval_ms=400"
GROUPS = 4  # groups cycling side by side (a start takes about 2 s on Tansu: the join, then a poll)
CYCLES = 5  # starts and stops per group
REBALANCE = 3  # the cycle that stops during a rebalance
SHUT = 4  # the cycle whose gate stays shut through the drain: records are left unsettled (the last:
# the next member counts their attempts and hands them out one at a time, so its prefetch never fills)
CONCURRENCY = 4  # prefetch 8: the dispatcher takes 8, the fetch loop then waits for room
PER_CYCLE = 2 * CONCURRENCY  # records published per cycle: one prefetch, all in hand at the stop
DRAIN = 1.0
BOUND = 6.0  # seconds a stop (drain included) and the transport's close may take
TIMEOUT = 30.0


@pytest.fixture
def revoking(monkeypatch: pytest.MonkeyPatch) -> dict[str, asyncio.Event]:
    """Per subscription name, set when its consumer starts revoking partitions (a rebalance is under way)."""
    started: dict[str, asyncio.Event] = {}
    revoked = kafka_consume.KafkaConsumer.revoked

    async def spy(self: kafka_consume.KafkaConsumer, partitions: set[object]) -> None:
        if partitions:  # a first join revokes nothing
            started.setdefault(self.subscription.name, asyncio.Event()).set()
        await revoked(self, partitions)  # type: ignore[arg-type]

    monkeypatch.setattr(kafka_consume.KafkaConsumer, "revoked", spy)
    return started


class Group:
    """Workers of one handler on the session broker, and what they handled.

    Args:
        url: the broker.
        revoking: the ``revoking`` fixture.
    """

    def __init__(self, url: str, revoking: dict[str, asyncio.Event]) -> None:
        self.url = url
        self.topic, self.name = unique("stop"), unique("stop")
        self.revoking = revoking.setdefault(self.name, asyncio.Event())
        self.gate = asyncio.Event()
        self.handled: set[str] = set()
        self.published: list[str] = []

        @on(self.topic, name=self.name, concurrency=CONCURRENCY)
        async def handle(payload: dict, ctx: Context) -> None:
            await self.gate.wait()
            self.handled.add(ctx.message.id)

        self.handlers = registry.Registry.of(handle).handlers

    async def start(self) -> tuple[KafkaTransport, Worker]:
        transport = KafkaTransport(self.url)
        await transport.connect()
        worker = Worker(self.handlers, transport, source="t")
        await worker.start()
        return transport, worker

    async def publish(self, count: int) -> None:
        events = [envelope.create(self.topic, {"n": n}, source="t") for n in range(count)]
        wire = [(self.topic, envelope.to_binary(e, envelope.KAFKA_PREFIX)) for e in events]
        publisher = KafkaTransport(self.url)
        await publisher.connect()
        try:
            assert not any(await publisher.publish_many(wire))
        finally:
            await publisher.close()
        self.published += [e.id for e in events]

    async def cycle(self, number: int, hops: int) -> None:
        """Start a worker, fill its prefetch, open the gate ``hops`` loop turns before stopping it."""
        await self.publish(PER_CYCLE)
        self.gate.clear()
        self.revoking.clear()
        transport, worker = await self.start()
        await wait_for(lambda: worker.load()[0][2] >= 2 * CONCURRENCY, TIMEOUT, "a full prefetch")
        second = None
        if number == REBALANCE:  # a second member joins: the first revokes its partitions
            second = asyncio.create_task(self.start())
            await asyncio.wait_for(self.revoking.wait(), TIMEOUT)
        if number != SHUT:
            self.gate.set()  # the acks settle everything and free prefetch room...
            for _ in range(hops):
                await asyncio.sleep(0)
        await self.stop_within_bound(transport, worker, f"cycle {number}")  # ...as the worker stops
        if second is not None:
            self.gate.set()
            await self.stop_within_bound(*await second, f"cycle {number}, second member")

    async def stop_within_bound(self, transport: KafkaTransport, worker: Worker, what: str) -> None:
        """Stop ``worker`` and close its transport; fail if that takes longer than :data:`BOUND`."""
        try:
            async with asyncio.timeout(BOUND):
                await worker.stop(DRAIN)
                await transport.close()
        except TimeoutError:
            pytest.fail(f"{what}: stopping the worker and closing its transport took longer than {BOUND}s")

    async def run(self, first_hops: int) -> None:
        """Every cycle, then one last worker that must handle every record published."""
        for number in range(CYCLES):
            await self.cycle(number, (first_hops + number) % 3)
        self.gate.set()
        transport, worker = await self.start()
        await wait_for(lambda: self.handled >= set(self.published), TIMEOUT, "every published record handled")
        await self.stop_within_bound(transport, worker, "the last worker")


async def test_worker_stops_within_a_bound_with_records_in_flight_and_during_rebalances(
    kafka_url: str, revoking: dict[str, asyncio.Event]
) -> None:
    groups = [Group(brokers.with_query(kafka_url, OPTIONS), revoking) for _ in range(GROUPS)]
    await asyncio.gather(*(group.run(n) for n, group in enumerate(groups)))
