"""Publishing on Kafka: ``publish_many`` (pipelined, per-message results) and the producer options, on Tansu."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.producer.message_accumulator import MessageBatch
from conveyor import errors
from conveyor.envelope import WireMessage
from conveyor.testing import brokers, unique
from conveyor.transports.kafka import KafkaOptions, KafkaTransport, parse_url

FAST = "session_timeout_ms=2000&heartbeat_interval_ms=400&partitions=4"
TIMEOUT = 30.0

Open = Callable[..., Awaitable[KafkaTransport]]


@pytest.fixture
async def open_kafka(kafka_url: str) -> AsyncIterator[Open]:
    opened: list[KafkaTransport] = []

    async def open_one(extra: str = "") -> KafkaTransport:
        transport = KafkaTransport(brokers.with_query(kafka_url, f"{FAST}&{extra}" if extra else FAST))
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in reversed(opened):
        await transport.close()


async def read_all(url: str, topic: str, count: int) -> list[tuple[str | None, bytes]]:
    """(key, body) of the first ``count`` records of ``topic``, partition by partition in log order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=",".join(parse_url(url)[0]), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(await consumer._client._wait_on_metadata(topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got: list[tuple[str | None, bytes]] = []
        while len(got) < count:
            batch = await consumer.getmany(timeout_ms=int(TIMEOUT * 1000))
            assert batch, f"only {len(got)} of {count} records arrived"
            for records in batch.values():
                got.extend((r.key.decode() if r.key is not None else None, r.value) for r in records)
        return got
    finally:
        await consumer.stop()


def message(key: str | None, n: int, size: int = 10) -> WireMessage:
    return WireMessage(f"{n}".encode().ljust(size, b"."), {"content-type": "text/plain"}, key, f"m-{key}-{n}")


async def test_publish_many_keeps_the_order_of_each_key(open_kafka: Open, kafka_url: str) -> None:
    transport = await open_kafka()
    topic = unique("pubmany")
    sent = [(topic, message(f"k{n % 5}", n)) for n in range(300)]
    results = await transport.publish_many(sent)
    got = await read_all(kafka_url, topic, len(sent))
    per_key = {key: [int(body.rstrip(b".")) for k, body in got if k == key] for key in {k for k, _ in got}}
    assert (results, per_key) == (
        [None] * len(sent),
        {f"k{i}": [n for n in range(300) if n % 5 == i] for i in range(5)},
    )


async def test_publish_many_reports_a_refused_message_and_sends_the_others(open_kafka: Open, kafka_url: str) -> None:
    transport = await open_kafka()
    topic = unique("pubmany")
    too_large = message("k", 1, size=2 * 1024 * 1024)  # over the producer's max_request_size (1 MiB)
    results = await transport.publish_many([(topic, message("k", 0)), (topic, too_large), (topic, message("k", 2))])
    got = await read_all(kafka_url, topic, 2)
    assert [type(r) for r in results] == [type(None), errors.TransportError, type(None)]
    assert [body for _, body in got] == [message("k", 0).body, message("k", 2).body]


async def test_publish_many_to_an_invalid_topic_reports_it_and_sends_the_others(
    open_kafka: Open, kafka_url: str
) -> None:
    transport = await open_kafka()
    topic = unique("pubmany")
    results = await transport.publish_many([(topic, message(None, 0)), ("Not A Topic*", message(None, 1))])
    got = await read_all(kafka_url, topic, 1)
    assert (results[0], isinstance(results[1], errors.ConfigurationError), got) == (
        None,
        True,
        [(None, message(None, 0).body)],
    )


async def test_publish_many_when_not_connected_raises_transport_error(kafka_url: str) -> None:
    transport = KafkaTransport(brokers.with_query(kafka_url, FAST))
    with pytest.raises(errors.TransportError):
        await transport.publish_many([(unique("pubmany"), message(None, 0))])


async def test_publish_many_of_nothing_returns_no_results(open_kafka: Open) -> None:
    transport = await open_kafka()
    assert await transport.publish_many([]) == []


# -- concurrent publishes ------------------------------------------------------------------


async def test_concurrent_publishes_wait_for_a_full_batch_one_at_a_time(
    open_kafka: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every publish waiting on a full batch is woken at each drain to find the next one
    # full too: with a thousand concurrent publishes that costs more than the sends.
    transport = await open_kafka("max_batch_size=16384")
    topic = unique("pubconc")
    await transport.declare([topic], [])
    waiting, most = 0, 0
    wait_drain = MessageBatch.wait_drain

    async def counted(self: MessageBatch, timeout: float | None = None) -> None:
        nonlocal waiting, most
        waiting += 1
        most = max(most, waiting)
        try:
            await wait_drain(self, timeout)
        finally:
            waiting -= 1

    monkeypatch.setattr(MessageBatch, "wait_drain", counted)
    await asyncio.gather(*(transport.publish(topic, message("k", n, size=1000)) for n in range(200)))
    assert most == 1


async def test_concurrent_publishes_of_one_key_keep_their_call_order(open_kafka: Open, kafka_url: str) -> None:
    transport = await open_kafka("max_batch_size=16384")
    topic = unique("pubconc")
    await transport.declare([topic], [])
    await asyncio.gather(*(transport.publish(topic, message("k", n, size=1000)) for n in range(200)))
    got = await read_all(kafka_url, topic, 200)
    assert [int(body.rstrip(b".")) for _, body in got] == list(range(200))


# -- producer options --------------------------------------------------------------------


def test_producer_batches_by_default() -> None:
    options = KafkaOptions()
    assert (options.linger_ms, options.max_batch_size) == (5, 256 * 1024)


def test_url_producer_options_are_parsed() -> None:
    _, options = parse_url("kafka://h:1?linger_ms=0&max_batch_size=1048576")
    assert (options.linger_ms, options.max_batch_size) == (0, 1048576)


def test_url_max_batch_size_of_zero_is_refused() -> None:
    with pytest.raises(errors.ConfigurationError, match="max_batch_size"):
        parse_url("kafka://h:1?max_batch_size=0")


def test_url_max_batch_size_over_the_request_size_is_refused() -> None:
    with pytest.raises(errors.ConfigurationError, match="max_batch_size=1048577"):
        parse_url("kafka://h:1?max_batch_size=1048577")


async def test_producer_uses_the_batch_options(open_kafka: Open) -> None:
    transport = await open_kafka()
    assert transport._producer is not None
    accumulator = transport._producer.producer._message_accumulator
    assert (accumulator._linger_time, accumulator._batch_size) == (0.005, 256 * 1024)
