"""Kafka records no well-behaved client writes: header names that are not UTF-8.

aiokafka's producer encodes header names with ``str.encode("utf-8")`` and its
C record builder refuses anything but ``str``. :func:`send_raw_names` sends one
record through aiokafka's pure-Python batch builder with header names given as
bytes, as a client writing raw bytes (librdkafka, a JVM client with a custom
serializer) can.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.producer import message_accumulator, producer
from aiokafka.record import default_records
from raw_names import RawName


@contextmanager
def raw_header_names() -> Iterator[None]:
    """Within: aiokafka producers build record batches in Python, so :class:`RawName` names go out as their bytes."""
    modules: list[Any] = [message_accumulator, producer]
    original = [module.DefaultRecordBatchBuilder for module in modules]
    for module in modules:
        module.DefaultRecordBatchBuilder = default_records._DefaultRecordBatchBuilderPy
    try:
        yield
    finally:
        for module, builder in zip(modules, original, strict=True):
            module.DefaultRecordBatchBuilder = builder


async def send_raw_names(
    bootstrap: str,
    topic: str,
    value: bytes,
    headers: Sequence[tuple[bytes, bytes | None]],
    *,
    key: bytes | None = None,
    partition: int | None = None,
) -> int:
    """Send one record whose header names are raw bytes; return its offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        with raw_header_names():
            sent = await producer.send_and_wait(
                topic, value, key=key, partition=partition, headers=[(RawName(n), v) for n, v in headers]
            )
        return int(sent.offset)
    finally:
        await producer.stop()
