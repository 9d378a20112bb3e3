"""Counting attempts that a crash cut short, for the Kafka consumer.

A :class:`Attempts` keeps the attempt marks (:mod:`conveyor.transports.kafka_marks`)
of the partitions a member owns:

* **Normal path**: before records beyond the current mark of a partition are
  handed out, the mark is raised past the highest of them, by ``lookahead``
  offsets more (one write for all the partitions of a fetched batch that need
  it, acknowledged before the hand-out; with the lookahead, one write per
  ``lookahead`` records of a partition rather than per batch). The lookahead
  is four prefetches, at most 128 records: past the records out, a crash
  leaves at most that many to recover one at a time.
* **Assignment**: the group's committed offset ``c`` and the mark ``s`` are
  read. ``s >= c`` means the previous owner died (or was fenced) with records
  of ``c..s`` possibly in hand: the partition is *recovered* up to ``s``. The consumer then
  hands out its records one at a time, and before each record
  :meth:`Attempts.count` writes ``(s, record, tries)`` with tries one more than
  the mark knew of that record. The delivery's attempt is at least ``tries``.
  The recovery ends at offset ``s``, or earlier at the end of the log (the
  lookahead may reach past it).
  A record that kills the worker is so named by the mark, and its attempts grow
  by one per crash until the runtime dead-letters it (``TooManyDeliveries``).
  Recovery is per partition: the member's other partitions go on meanwhile,
  and of the partitions being recovered one record at a time is out. A crash
  while a recovered record is out counts against it even when a record of
  another partition caused it; that happens at most once per such record
  (the partition it came from is recovered, one record at a time, from then on).
* **Graceful handover** (revocation, close): the mark is reset to what the next
  owner must know: nothing, unless deliveries whose handler started are
  abandoned unsettled (they count as attempts, as on brokers with a delivery
  count) or a recovery was unfinished.

Writes are fenced by the writer (see :mod:`conveyor.transports.kafka_marks`):
one at a time, none for a partition being revoked, none once the member's
group generation is no longer the one its partitions were assigned in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors

from conveyor import errors
from conveyor.transports import kafka_marks, kafka_offsets

log = logging.getLogger("conveyor.transports.kafka")

Batch = dict[TopicPartition, list[Any]]


class Attempts:
    """The attempt marks of one consumer's partitions.

    Args:
        kafka: the subscription's group consumer (for seeks and positions).
        store: where marks are kept; None counts nothing (every method is a no-op).
        name: the subscription name, for logs.
        grace: seconds a handover may spend writing marks.
        lookahead: how far past the records handed out a mark reaches (fewer
            writes, and a longer serial pass after a crash).
    """

    def __init__(
        self, kafka: AIOKafkaConsumer, store: kafka_marks.MarkStore | None, name: str, grace: float, lookahead: int
    ) -> None:
        self._kafka = kafka
        self._store = store
        self._name = name
        self._grace = grace
        self._lookahead = lookahead
        self._writing = asyncio.Lock()  # one mark write at a time: a revocation's lands after the one in flight

    async def start(self) -> None:
        """Connect the mark store."""
        if self._store is not None:
            await self._store.start()

    async def stop(self) -> None:
        """Disconnect the mark store; idempotent."""
        if self._store is not None:
            await self._store.stop()

    async def restore(self, partitions: list[kafka_offsets.PartitionOffsets]) -> None:
        """Read committed offsets and marks of newly assigned partitions; end their loading.

        A mark that cannot be read counts as none (logged): the records run as new.
        """
        loaded: dict[TopicPartition, tuple[int | None, kafka_marks.Mark]] = {}
        if self._store is not None and partitions:
            try:
                loaded = await self._store.load(p.tp for p in partitions)
            except errors.TransportError as exc:
                log.warning("%s: %s; attempts cut short by a crash will not be counted", self._name, exc)
        for partition in partitions:
            committed, mark = loaded.get(partition.tp, (None, kafka_marks.CLEAN))
            partition.restore(committed, mark)
            if partition.suspect >= 0:
                log.warning(
                    "%s: the previous owner of %s[%d] stopped with records up to offset %d in hand; "
                    "handing them out one at a time, counting attempts",
                    self._name, partition.tp.topic, partition.tp.partition, partition.suspect,
                )  # fmt: skip

    async def mark(self, batch: Batch, partitions: dict[TopicPartition, kafka_offsets.PartitionOffsets]) -> None:
        """Raise the marks to cover ``batch`` before any of it is handed out.

        Raises:
            TransientTransportError: the marks were not written; the batch's
                partitions are rewound, so it is fetched again.
        """
        if self._store is None:
            return
        async with self._writing:  # after a write in flight: a revocation that began meanwhile is seen
            marks = {}
            for tp, records in batch.items():
                partition = partitions.get(tp)
                if (
                    partition is not None
                    and records
                    and not partition.draining
                    and records[-1].offset > partition.marked
                ):
                    marks[tp] = partition.mark(records[-1].offset + self._lookahead)
            try:
                self._check_generation(marks, partitions)
                await self._store.save(marks)
            except errors.TransportError:
                for tp, records in batch.items():
                    if records and tp in partitions:
                        self._kafka.seek(tp, records[0].offset)
                        partitions[tp].fetched = records[0].offset
                raise
        for tp, mark in marks.items():
            partitions[tp].marked = max(partitions[tp].marked, mark.through)

    async def count(self, partition: kafka_offsets.PartitionOffsets, offset: int) -> int:
        """Count an attempt of a recovered record, durably, before it is handed out; return its tries.

        Raises:
            TransientTransportError: not written; the partition is rewound to ``offset``.
        """
        if self._store is None:
            partition.tries[offset] = partition.tries.get(offset, 0) + 1
            return partition.tries[offset]
        async with self._writing:
            if partition.draining:
                return 0  # being revoked: not handed out, its next owner counts it
            tries = partition.tries[offset] = partition.tries.get(offset, 0) + 1
            try:
                self._check_generation({partition.tp: None}, {partition.tp: partition})
                await self._store.save({partition.tp: partition.mark(partition.suspect)})
            except errors.TransportError:
                if tries > 1:
                    partition.tries[offset] = tries - 1
                else:
                    del partition.tries[offset]
                self._kafka.seek(partition.tp, offset)
                partition.fetched = offset
                raise
        return tries

    def _check_generation(
        self, tps: Iterable[TopicPartition], partitions: dict[TopicPartition, kafka_offsets.PartitionOffsets]
    ) -> None:
        """Refuse to write marks of partitions assigned in an earlier generation of the group.

        A member whose membership the coordinator no longer knows (its session
        expired: aiokafka resets its generation) must not overwrite what the
        partitions' new owners write.

        Raises:
            TransientTransportError: the member's generation is not the one its partitions were assigned in.
        """
        now = kafka_marks.generation(self._kafka)
        stale = [tp for tp in tps if (p := partitions.get(tp)) is not None and p.generation != now]
        if stale and now is not None:
            raise errors.TransientTransportError(
                f"{self._name}: the group generation changed ({now}) since {len(stale)} partition(s) were "
                "assigned; writing no attempt marks for them"
            )

    async def end_recoveries(self, partitions: Iterable[kafka_offsets.PartitionOffsets]) -> None:
        """End the recovery of partitions read past their mark or to the end of the log (pass those with none out)."""
        for partition in partitions:
            if partition.suspect < 0 or partition.draining:
                continue
            try:
                position = await asyncio.wait_for(self._kafka.position(partition.tp), 1.0)
            except (TimeoutError, kafka_errors.KafkaError):
                continue  # asked again at the next step
            end = self._kafka.highwater(partition.tp)  # known once fetched; all the previous owner could see
            if position > partition.suspect or (end is not None and position >= end):
                partition.suspect = -1
                log.info("%s: recovered %s[%d]", self._name, partition.tp.topic, partition.tp.partition)

    async def hand_over(self, partitions: Iterable[kafka_offsets.PartitionOffsets]) -> None:
        """Write the marks of partitions let go gracefully (see ``PartitionOffsets.handover``)."""
        now = kafka_marks.generation(self._kafka)
        # A member that lost its membership (generation reset) leaves the marks to the new owners.
        marks = {p.tp: p.handover() for p in partitions if not p.loading and (now is None or p.generation == now)}
        if self._store is None or not marks:
            return
        try:
            async with asyncio.timeout(self._grace), self._writing:  # after the write in flight, never before
                await self._store.save(marks)
        except (errors.TransportError, TimeoutError) as exc:
            log.warning("%s: could not write attempt marks when letting partitions go (%r); their next "
                        "owner re-runs their records one at a time", self._name, exc)  # fmt: skip
