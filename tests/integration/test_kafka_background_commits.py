"""Acks commit in the background: what a crash or a stop before that commit leaves behind, on Tansu.

An ack returns once its offset is recorded; the commit follows. A member that
dies before the commit leaves those records to the next member (at-least-once:
redelivered, never lost); a member that stops gracefully commits them first.
The crash is simulated in-process: the member's commits are blocked, then its
clients are stopped without the final commit, as if the process had died.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from conveyor import envelope, ports
from conveyor.testing import Collector, brokers, unique, wait_for
from conveyor.transports import kafka_consume
from conveyor.transports.kafka import KafkaTransport, parse_url

ONE_PARTITION = "partitions=1&session_timeout_ms=2000&heartbeat_interval_ms=400"
TIMEOUT = 30.0

Open = Callable[[], Awaitable[KafkaTransport]]


@pytest.fixture
async def open_kafka(kafka_url: str) -> AsyncIterator[Open]:
    opened: list[KafkaTransport] = []

    async def open_one() -> KafkaTransport:
        transport = KafkaTransport(brokers.with_query(kafka_url, ONE_PARTITION))
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in reversed(opened):
        await transport.close()


async def publish(transport: KafkaTransport, topic: str, numbers: range) -> None:
    for n in numbers:  # one at a time: in order on the one partition
        await transport.publish(topic, envelope.WireMessage(f"r{n}".encode(), {}, None, f"m{n}"))


async def committed(url: str, group: str, topic: str) -> int:
    """The group's committed offset of partition 0 (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=",".join(parse_url(url)[0]))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[TopicPartition(topic, 0)])
    finally:
        await admin.close()
    found = offsets.get(TopicPartition(topic, 0))
    return found.offset if found is not None else -1


async def wait_committed(url: str, group: str, topic: str, offset: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            if await committed(url, group, topic) == offset:
                return
            await asyncio.sleep(0.05)


async def crash(transport: KafkaTransport, consumer: kafka_consume.KafkaConsumer) -> None:
    """End the member as a killed process would: no final commit, no handover."""
    transport._consumers.remove(consumer)
    consumer.closed = True
    tasks = [t for t in (consumer._task, consumer._committer._task) if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await consumer._kafka.stop()
    await consumer._attempts.stop()


async def test_crash_after_acks_before_their_commit_redelivers_only_the_uncommitted_records(
    open_kafka: Open, kafka_url: str
) -> None:
    first = await open_kafka()
    topic, name = unique("bgcommit"), unique("bgcommit")
    sub = ports.Subscription(name=name, topic=topic)
    collector = Collector()  # acks each delivery
    consumer = await first.subscribe(sub, collector)
    assert isinstance(consumer, kafka_consume.KafkaConsumer)
    await publish(first, topic, range(5))
    await collector.wait(5, TIMEOUT)
    await wait_committed(kafka_url, name, topic, 5)
    never = asyncio.Event()

    async def blocked(offsets: object) -> None:
        await never.wait()

    consumer._kafka.commit = blocked  # type: ignore[method-assign]
    await publish(first, topic, range(5, 10))
    async with asyncio.timeout(TIMEOUT):  # acks of the last five return though their commit hangs
        await collector.wait(10, TIMEOUT)
    await crash(first, consumer)
    left = await committed(kafka_url, name, topic)

    second = await open_kafka()
    await publish(second, topic, range(10, 11))  # one partition: all before it arrive first
    again = Collector()
    await second.subscribe(sub, again)
    await wait_for(lambda: b"r10" in again.bodies(), TIMEOUT, "the record published after the crash")
    assert (left, again.bodies()) == (5, [f"r{n}".encode() for n in range(5, 11)])


async def test_close_right_after_acks_commits_them(open_kafka: Open, kafka_url: str) -> None:
    transport = await open_kafka()
    topic, name = unique("bgcommit"), unique("bgcommit")
    collector = Collector()
    await transport.subscribe(ports.Subscription(name=name, topic=topic), collector)
    await publish(transport, topic, range(10))
    await collector.wait(10, TIMEOUT)
    await transport.close()
    assert await committed(kafka_url, name, topic) == 10
