"""A Kafka record aiokafka cannot decode (a header name that is not UTF-8), on Tansu.

aiokafka raises ``CorruptRecordException`` for the whole fetch, losing the
records of other partitions it had already drained in the same call. The
consumer must dead-letter the record with what bytes can be kept, go on
past it, and lose nothing else.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer
from conveyor import ports
from conveyor.envelope import WireMessage
from conveyor.runtime import dead_letters
from conveyor.testing import brokers, unique, wait_for
from conveyor.transports.kafka import KafkaTransport
from kafka_raw import send_raw_names

OPTIONS = "?idempotence=0&partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400"
GOOD = 50
TIMEOUT = 30.0
BAD_NAME = b"x-bad-\xff\xfe-name"


async def test_record_with_a_header_name_that_is_not_utf8_is_dead_lettered_and_the_rest_flows(kafka_url: str) -> None:
    url = brokers.with_query(kafka_url, OPTIONS)
    topic, name = unique("undecodable"), unique("undecodable")
    transport = KafkaTransport(url)
    await transport.connect()
    handled: list[bytes] = []

    async def handle(delivery: ports.Delivery) -> None:
        handled.append(delivery.message.body)
        await delivery.ack()

    try:
        await transport.declare([topic], [])
        bootstrap = ",".join(transport.servers)
        headers = [(b"ce_id", b"bad-1"), (BAD_NAME, b"\x00raw value\xff"), (b"plain", b"kept")]
        await send_raw_names(bootstrap, topic, b"\x01body\xfe", headers, key=b"k\xffey", partition=0)
        good = [f"good-{n}".encode() for n in range(GOOD)]
        for n, body in enumerate(good):
            await transport.publish(topic, WireMessage(body, key=f"key-{n}"))
        consumer = await transport.subscribe(ports.Subscription(name, topic), handle)
        await wait_for(lambda: set(good) <= set(handled), TIMEOUT, "every good record")
        await consumer.stop()
        letters = await dead_letters.peek(transport, topic, idle=1.0)
        (raw,) = await read_raw(bootstrap, topic + ".dlq")
    finally:
        await transport.close()
    assert sorted(handled) == sorted(good)  # each once, the undecodable one never
    assert [(d.error_type, d.topic) for d in letters] == [("UndecodableRecord", topic)]
    assert (raw.key, raw.value) == (b"k\xffey", b"\x01body\xfe")  # byte for byte
    headers = dict(raw.headers)
    # The name kept decoded as Latin-1 (each byte one character), the values byte for byte.
    assert (headers["ce_id"], headers[BAD_NAME.decode("latin-1")], headers["plain"]) == (
        b"bad-1",
        b"\x00raw value\xff",
        b"kept",
    )
    assert "not UTF-8" in headers["conveyor-dlq-error"].decode()


async def read_raw(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` as aiokafka reads it (no group)."""
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await reader.start()
    try:
        batch = await reader.getmany(timeout_ms=int(TIMEOUT * 1000))
        return [record for records in batch.values() for record in records]
    finally:
        await reader.stop()
