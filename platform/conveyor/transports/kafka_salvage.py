"""Records aiokafka cannot decode: found by fetching and parsing the raw bytes, leniently.

Kafka header names are strings on the wire, but nothing stops a client from
writing bytes that are not UTF-8 there. aiokafka decodes them strictly while
it iterates a fetched batch (``DefaultRecordBatch._read_msg``, C or Python:
``UnicodeDecodeError``, or ``CorruptRecordException`` wrapping it), out of
``getmany``: the whole call fails, the position of the partition stays before
the record, and every retry fails the same way, for ever. Worse, the records
of other partitions that call had already drained (their positions advanced)
are lost with the exception.

:func:`fetch` asks the partition leaders for the records at given positions
(a plain ``Fetch`` through the consumer's client) and parses the record
batches (format v2; ``magic`` 0 and 1 have no headers, so aiokafka decodes
them) without that strictness: header names that are not UTF-8 are decoded as
Latin-1 (one character per byte, so the bytes can be told back) and the record
is marked :attr:`RawRecord.undecodable`. The consumer hands out the records
before it as usual and dead-letters it (see
:meth:`Salvaging.quarantine`), committing past it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.protocol.fetch import FetchRequest

from conveyor import errors, ports
from conveyor.dead_letter import DLQ_HEADER, dead_letter_headers, dead_letter_topic
from conveyor.transports import kafka_offsets

log = logging.getLogger("conveyor.transports.kafka")

SendRecord = Callable[[str, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]]], Awaitable[None]]
"""Publishes one record as given: topic, value, key, headers."""

#: What aiokafka raises out of ``getmany`` for a record it cannot decode.
UNDECODABLE = (kafka_errors.CorruptRecordException, UnicodeDecodeError)

_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")  # v2 record batch header, 61 bytes
_CODECS = {1: gzip_decode, 2: snappy_decode, 3: lz4_decode, 4: zstd_decode}
_CONTROL = 0x20
_PARTITION_BYTES = 1 << 20
_WAIT_MS = 500  # Tansu answers a fetch with max_wait 0 with no records at all


@dataclasses.dataclass(frozen=True, slots=True)
class RawRecord:
    """A record as the broker holds it; the attributes :func:`~conveyor.transports.kafka_delivery.from_record` reads.

    Attributes:
        headers: names decoded as UTF-8, or as Latin-1 where they are not UTF-8; values as sent.
        undecodable: header names that are not UTF-8 (as sent); empty: aiokafka decodes the record.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    undecodable: tuple[bytes, ...] = ()


async def fetch(
    kafka: AIOKafkaConsumer, positions: dict[TopicPartition, int], timeout: float
) -> dict[TopicPartition, list[RawRecord]]:
    """The records of each partition from its position on (one fetch's worth), parsed leniently.

    Raises:
        TransientTransportError: the leader is unknown or did not answer in time.
    """
    client = _client(kafka)
    by_leader: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(lambda: defaultdict(list))
    for tp, position in positions.items():
        leader = client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            raise errors.TransientTransportError(f"no known leader for Kafka partition {tp.topic}[{tp.partition}]")
        by_leader[leader][tp.topic].append((tp.partition, position, _PARTITION_BYTES))
    found: dict[TopicPartition, list[RawRecord]] = {}
    for leader, topics in by_leader.items():
        request = FetchRequest(_WAIT_MS, 1, 50 * _PARTITION_BYTES, 0, list(topics.items()))
        try:
            response = await asyncio.wait_for(client.send(leader, request), timeout)
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            raise errors.TransientTransportError(f"fetching raw Kafka records failed: {exc!r}") from exc
        for topic, partitions in response.topics:
            for partition, code, _highwater, *data in partitions:
                tp = TopicPartition(topic, partition)
                if code == 0 and tp in positions:
                    found[tp] = [r for r in parse(data[-1] or b"", topic, partition) if r.offset >= positions[tp]]
    return found


def parse(data: bytes, topic: str, partition: int) -> list[RawRecord]:
    """The records of v2 record batches in ``data`` (a partial batch at the end is left out).

    Raises:
        TransportError: a batch is compressed with an unknown codec.
    """
    records: list[RawRecord] = []
    view = memoryview(data)
    pos = 0
    while pos + 17 <= len(view):
        base_offset, length = struct.unpack_from(">qi", view, pos)
        end = pos + 12 + length
        if view[pos + 16] != 2 or end > len(view):  # an older format (no headers) or a partial batch
            break
        (*_, attributes, _delta, _ts, _max_ts, _pid, _epoch, _seq, count) = _BATCH_HEADER.unpack_from(view, pos)
        body = view[pos + _BATCH_HEADER.size : end]
        pos = end
        if attributes & _CONTROL:
            continue
        codec = attributes & 0x07
        if codec:
            if codec not in _CODECS:
                raise errors.TransportError(f"Kafka record batch compressed with unknown codec {codec}")
            body = memoryview(_CODECS[codec](bytes(body)))
        records.extend(_records(body, count, base_offset, topic, partition))
    return records


def _records(body: memoryview, count: int, base: int, topic: str, partition: int) -> list[RawRecord]:
    records = []
    pos = 0
    for _ in range(count):
        _length, pos = _varint(body, pos)
        pos += 1  # attributes
        _timestamp_delta, pos = _varint(body, pos)
        offset_delta, pos = _varint(body, pos)
        key, pos = _bytes(body, pos)
        value, pos = _bytes(body, pos)
        header_count, pos = _varint(body, pos)
        headers: list[tuple[str, bytes | None]] = []
        undecodable: list[bytes] = []
        for _ in range(header_count):
            raw_name, pos = _bytes(body, pos)
            header_value, pos = _bytes(body, pos)
            name_bytes = raw_name or b""
            try:
                name = name_bytes.decode()
            except UnicodeDecodeError:
                name = name_bytes.decode("latin-1")
                undecodable.append(name_bytes)
            headers.append((name, header_value))
        records.append(RawRecord(topic, partition, base + offset_delta, key, value, tuple(headers), tuple(undecodable)))
    return records


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """A zigzag varint (Kafka's record fields) at ``pos``; the value and the position after it."""
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _bytes(data: memoryview, pos: int) -> tuple[bytes | None, int]:
    length, pos = _varint(data, pos)
    if length < 0:
        return None, pos
    return bytes(data[pos : pos + length]), pos + length


def _client(kafka: AIOKafkaConsumer) -> Any:
    # Private API, in this one place: the consumer's client knows the partition leaders
    # and sends requests on its connections.
    client = getattr(kafka, "_client", None)
    if client is None:
        raise errors.TransportError("the Kafka consumer has no client (not started?)")
    return client


class Salvaging:
    """Fetching records when aiokafka cannot decode one (a mixin of ``KafkaConsumer``)."""

    subscription: ports.Subscription
    _kafka: AIOKafkaConsumer
    _partitions: dict[TopicPartition, kafka_offsets.PartitionOffsets]
    _paused: set[TopicPartition]
    _committer: kafka_offsets.Committer
    _send_record: SendRecord | None
    _request_timeout: float

    async def _getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        """``getmany``; a record aiokafka cannot decode is found and returned as a :class:`RawRecord`.

        The records before it come first (up to ``max_records``), then, alone
        in a later call, the undecodable record itself.

        Raises:
            TransientTransportError: the raw records could not be fetched, or
                none was found undecodable (the error is not this one).
        """
        try:
            batch: dict[TopicPartition, list[Any]] = await self._kafka.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except UNDECODABLE as exc:
            return await self._salvage(exc, max_records)
        for tp, records in batch.items():
            partition = self._partitions.get(tp)
            if partition is not None and records:
                partition.fetched = records[-1].offset + 1
        return batch

    async def _salvage(self, exc: Exception, limit: int) -> dict[TopicPartition, list[Any]]:
        positions = await self._rewind()
        fetchable = {tp: position for tp, position in positions.items() if tp not in self._paused}
        found = await fetch(self._kafka, fetchable, self._request_timeout)
        bad = {tp: i for tp, records in found.items() if (i := _first_undecodable(records)) is not None}
        for tp, index in bad.items():
            if index == 0:  # at the position: handed over alone
                self._seek(tp, found[tp][0].offset + 1)
                return {tp: found[tp][:1]}
        batch: dict[TopicPartition, list[Any]] = {}
        for tp, index in bad.items():
            if limit <= 0:
                break
            batch[tp] = found[tp][: min(index, limit)]
            limit -= len(batch[tp])
            self._seek(tp, batch[tp][-1].offset + 1)
        if not batch:
            raise errors.TransientTransportError(
                f"the Kafka client could not decode fetched records ({exc!r}) and no record at the "
                "consumer's positions has an undecodable header name"
            )
        return batch

    async def _rewind(self) -> dict[TopicPartition, int]:
        """Seek every partition back to the first record not received; return those positions.

        The failed ``getmany`` may have drained (and advanced past) records of
        other partitions before it failed: they were never returned.
        """
        positions = {}
        for tp, partition in self._partitions.items():
            if partition.loading or partition.draining:
                continue
            if partition.fetched is None:  # never committed, nothing received: from the log's start
                await self._kafka.seek_to_beginning(tp)
                positions[tp] = await self._kafka.position(tp)
                continue
            if await self._kafka.position(tp) != partition.fetched:
                self._kafka.seek(tp, partition.fetched)
            positions[tp] = partition.fetched
        return positions

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        self._kafka.seek(tp, offset)
        partition = self._partitions.get(tp)
        if partition is not None:
            partition.fetched = offset

    async def quarantine(self, partition: kafka_offsets.PartitionOffsets, record: RawRecord) -> None:
        """Dead-letter a record aiokafka cannot decode, with what bytes can be kept, and settle it.

        The dead letter has the record's key, value and header values byte for
        byte, header names that are not UTF-8 decoded as Latin-1, and
        ``conveyor-dlq-*`` headers (error type ``UndecodableRecord``, 0 attempts:
        it never ran).

        Raises:
            TransportError: the dead letter was not published; the partition is
                rewound to the record, which is salvaged again.
        """
        names = ", ".join(repr(name) for name in record.undecodable)
        text = (
            f"the Kafka client cannot decode record {record.topic}[{record.partition}] at offset {record.offset}: "
            f"header name(s) {names} not UTF-8 (kept decoded as Latin-1; key, value and header values as sent)"
        )
        why = dead_letter_headers(self.subscription.name, self.subscription.topic, "UndecodableRecord", text, 0)
        headers = [(name, value) for name, value in record.headers if not name.startswith(DLQ_HEADER)]
        headers.extend((name, value.encode()) for name, value in why.items())
        try:
            if self._send_record is None:
                raise errors.TransportError("this Kafka consumer cannot publish dead letters")
            await self._send_record(dead_letter_topic(self.subscription.topic), record.value, record.key, headers)
        except errors.TransportError:
            self._seek(partition.tp, record.offset)
            raise
        log.error("%s: dead-lettered an undecodable record: %s", self.subscription.name, text)
        partition.take(record.offset)
        commit = partition.settle(record.offset)
        if commit is not None:
            self._committer.request(partition.tp, commit)


def _first_undecodable(records: list[RawRecord]) -> int | None:
    return next((i for i, record in enumerate(records) if record.undecodable), None)
