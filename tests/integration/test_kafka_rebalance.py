"""A second member joins a Kafka group while the first is busy, on Tansu.

The first member has deliveries of every partition in flight (their handler
blocked), more queued in the dispatcher's key lanes and one waiting for room.
The second member's JoinGroup makes the first revoke all its partitions; its
handlers finish ``SLOW`` seconds into the revocation: later than the group
could rebalance without waiting for them (about 1.7 s on Tansu), sooner than
the revocation grace. The handover must run no record on both members at
once, lose none, and hand the new owners no record the first member finished.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka.partitioner import DefaultPartitioner
from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.runtime import dispatch
from conveyor.testing import brokers, unique, wait_for
from conveyor.transports import kafka_consume
from conveyor.transports.kafka import KafkaTransport

PARTITIONS = 4
GROUP = "session_timeout_ms=2000&heartbeat_interval_ms=400&rebalance_timeout_ms=8000&revoke_grace_ms=3500"
OPTIONS = f"partitions={PARTITIONS}&{GROUP}"
SLOW = 2.5  # seconds the first member's blocked handlers still take once the revocation starts
CONCURRENCY = 4  # with the dispatcher's default buffer, 8 deliveries are accepted at once
WORK = 0.02  # seconds of (simulated) work per handled record
TIMEOUT = 30.0

Open = Callable[[], Awaitable[KafkaTransport]]


@pytest.fixture
async def open_kafka(kafka_url: str) -> AsyncIterator[Open]:
    """Open transports on the session broker; close them at teardown."""
    opened: list[KafkaTransport] = []

    async def open_one() -> KafkaTransport:
        transport = KafkaTransport(brokers.with_query(kafka_url, OPTIONS))
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in reversed(opened):
        await transport.close()


@pytest.fixture
def revoking(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set when a consumer starts revoking partitions (aiokafka calls the listener before rejoining)."""
    started = asyncio.Event()
    revoked = kafka_consume.KafkaConsumer.revoked

    async def spy(self: kafka_consume.KafkaConsumer, partitions: set[object]) -> None:
        if partitions:  # a first join revokes nothing
            started.set()
        await revoked(self, partitions)  # type: ignore[arg-type]

    monkeypatch.setattr(kafka_consume.KafkaConsumer, "revoked", spy)
    return started


def two_keys_per_partition() -> list[str]:
    """Keys that the producer's partitioner spreads two to a partition."""
    partitioner, every = DefaultPartitioner(), list(range(PARTITIONS))
    found: dict[int, list[str]] = defaultdict(list)
    for n in itertools.count():
        key = f"key-{n}"
        keys = found[partitioner(key.encode(), every, every)]
        if len(keys) < 2:
            keys.append(key)
        if len(found) == PARTITIONS and all(len(k) == 2 for k in found.values()):
            return [key for keys in found.values() for key in keys]
    raise AssertionError("unreachable")


class Handling:
    """What the members of a group handle: how often, overlaps between members, failed acks."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.started: Counter[bytes] = Counter()
        self.acked: Counter[bytes] = Counter()
        self.ack_failed: set[bytes] = set()
        self.overlaps: list[tuple[bytes, str, str]] = []
        self._running: dict[bytes, set[str]] = defaultdict(set)

    def process(self, member: str) -> dispatch.Process:
        """The handler of ``member``: the first member's ``late`` records wait for the gate."""

        async def process(delivery: ports.Delivery) -> None:
            body = delivery.message.body
            running = self._running[body]
            self.overlaps.extend((body, member, other) for other in running)
            running.add(member)
            self.started[body] += 1
            try:
                if member == "first" and body.startswith(b"late"):
                    await self.gate.wait()
                await asyncio.sleep(WORK)
                try:
                    await delivery.ack()
                except errors.TransportError:
                    self.ack_failed.add(body)  # not committed: redelivery is expected
                else:
                    self.acked[body] += 1
            finally:
                running.discard(member)

        return process


async def publish(transport: KafkaTransport, topic: str, prefix: str, keys: list[str], rounds: int) -> list[bytes]:
    bodies = []
    for n in range(rounds):
        for key in keys:
            body = f"{prefix}:{key}:{n}".encode()
            await transport.publish(topic, WireMessage(body, key=key))
            bodies.append(body)
    return bodies


async def second_member_joins_while_the_first_is_busy(open_kafka: Open, revoking: asyncio.Event) -> Handling:
    first, second = await open_kafka(), await open_kafka()
    topic, keys = unique("kx"), two_keys_per_partition()
    sub = ports.Subscription(unique("sub"), topic, prefetch=16)
    await first.declare([topic], [sub])
    handling = Handling(asyncio.Event())
    busy = dispatch.Dispatcher(handling.process("first"), CONCURRENCY)
    first_consumer = await first.subscribe(sub, busy.submit)
    early = await publish(first, topic, "early", keys, 1)
    await wait_for(lambda: all(handling.acked[b] for b in early), TIMEOUT, "the early records")
    late = await publish(first, topic, "late", keys, 3)
    await wait_for(lambda: busy.in_flight >= 2 * CONCURRENCY, TIMEOUT, "a full dispatcher")

    async def release_when_revoking() -> None:
        await revoking.wait()
        asyncio.get_running_loop().call_later(SLOW, handling.gate.set)  # slow handlers, not a wait

    # subscribe() returns once the group has rejoined, which waits for the first member's revocation.
    releasing = asyncio.get_running_loop().create_task(release_when_revoking())
    joining = dispatch.Dispatcher(handling.process("second"), CONCURRENCY)
    second_consumer = await second.subscribe(sub, joining.submit)
    await asyncio.wait_for(releasing, TIMEOUT)
    await wait_for(lambda: first_consumer.active and second_consumer.active, TIMEOUT, "the new assignment")
    # Redelivered records of a partition come before its later records: once the
    # markers are handled, every redelivery has happened.
    markers = await publish(first, topic, "marker", keys, 1)
    every = [*early, *late, *markers]
    await wait_for(lambda: all(handling.acked[b] for b in every), TIMEOUT, "every record acked")
    return handling


async def test_rebalance_while_busy_runs_no_record_on_two_members_at_once(
    open_kafka: Open, revoking: asyncio.Event
) -> None:
    handling = await second_member_joins_while_the_first_is_busy(open_kafka, revoking)
    assert handling.overlaps == []


async def test_rebalance_while_busy_hands_no_finished_record_to_the_new_owner(
    open_kafka: Open, revoking: asyncio.Event
) -> None:
    handling = await second_member_joins_while_the_first_is_busy(open_kafka, revoking)
    redelivered = {body for body, count in handling.started.items() if count > 1}
    assert redelivered <= handling.ack_failed
