"""Attempt marks of the Kafka consumer: what a member had handed out when it died.

Kafka keeps no delivery count: a record that kills its worker (a segfault, an
OOM kill) before it is nacked comes back from the committed offset with the
same headers, forever. So a member records, durably and *before* handing
records out, how far it handed them out; the partition's next owner compares
that *mark* with the group's committed offset and knows whether the previous
owner died with records in hand (see :mod:`conveyor.transports.kafka`).

Where marks are kept: in the committed offsets of a *shadow* consumer group,
``_conveyor.attempts.<subscription name>``, one per partition of the
subscription's topics. The group is never joined; its offsets are committed
and fetched as a standalone consumer would (generation -1). The committed
"offset" is not an offset but a :class:`Mark` packed into 63 bits. Commit
metadata would be the natural place, but Tansu (the broker of our tests) drops
it (measured with Tansu 0.6.0: ``OffsetFetch`` returns ``""``), and offsets of
a second group work on every Kafka-protocol broker.

Fencing. The broker cannot fence these writes (a standalone commit carries no
generation), and a mark read back cannot tell what it overwrote, so carrying
the generation *in* the mark would let a reader detect nothing useful; the
writer fences itself instead (:class:`~conveyor.transports.kafka_attempts.Attempts`):
one write at a time, so a revocation's handover mark lands after the write in
flight and before the revocation returns (the group waits for it: no new owner
reads or writes the mark earlier); no write for a partition being revoked; and
no write at all once the member's group generation differs from the one its
partitions were assigned in (aiokafka resets it when the coordinator forgot the
member: its session expired). What is left is a member cut off without knowing
it, whose write was sent before the new owner's and arrives after it; the worst
outcome is then a needless recovery pass or a miscounted attempt, never a lost
record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.structs import OffsetAndMetadata

from conveyor import errors

log = logging.getLogger("conveyor.transports.kafka")

SHADOW_PREFIX = "_conveyor.attempts."
# The near form (the only one before far counts existed, so old marks still read):
#   (through + 1) << 16 | distance << 6 | tries, with distance = through - offset <= 1023.
_TRIES_BITS = 6  # attempts counted up to 63
_DISTANCE_BITS = 10
_MAX_TRIES = (1 << _TRIES_BITS) - 1
_MAX_DISTANCE = (1 << _DISTANCE_BITS) - 1
_SHIFT = _TRIES_BITS + _DISTANCE_BITS
_NEAR_THROUGH = (1 << (62 - _SHIFT)) - 1  # through + 1 below 2**46: bit 62 stays clear
# The far form, for a counted record more than 1023 offsets below `through`, or a `through`
# of 2**46 - 1 or more (bit 62 set):
#   1 << 62 | code << 53 | tries << 47 | offset, where `code` is through - offset rounded
#   *up* to mantissa << exponent (4-bit mantissa, 5-bit exponent): the count is exact for
#   any offset, and the recovery range is never shortened (at most an eighth longer) for
#   distances up to 15 << 31 (32 billion offsets).
_FAR = 1 << 62
_OFFSET_BITS = 47
_MAX_OFFSET = (1 << _OFFSET_BITS) - 1
_MANTISSA_BITS = 4
_MAX_EXPONENT = 31


def shadow_group(subscription: str) -> str:
    """The consumer group whose committed offsets hold the marks of ``subscription``."""
    return SHADOW_PREFIX + subscription


def _round_up(distance: int) -> int:
    """``distance`` as the code of the smallest ``mantissa << exponent`` at least as large."""
    exponent = max(distance.bit_length() - _MANTISSA_BITS, 0)
    mantissa = (distance + (1 << exponent) - 1) >> exponent
    if mantissa >> _MANTISSA_BITS:  # rounding carried into a fifth bit
        exponent += 1
        mantissa = (distance + (1 << exponent) - 1) >> exponent
    if exponent > _MAX_EXPONENT:  # over 32 billion offsets: unreachable in practice
        exponent, mantissa = _MAX_EXPONENT, (1 << _MANTISSA_BITS) - 1
    return exponent << _MANTISSA_BITS | mantissa


def _distance(code: int) -> int:
    return (code & ((1 << _MANTISSA_BITS) - 1)) << (code >> _MANTISSA_BITS)


@dataclasses.dataclass(frozen=True, slots=True)
class Mark:
    """How far a member handed records of one partition out, and one record's known attempts.

    Attributes:
        through: offset up to which records may have been handed out (or held),
            fates unknown; -1: none.
        offset: a record at or before ``through`` whose attempts are known; -1: none.
        tries: attempts of ``offset`` that started and never settled (0 with no ``offset``).
    """

    through: int = -1
    offset: int = -1
    tries: int = 0

    def encode(self) -> int:
        """The mark as a non-negative 63-bit integer (0 = nothing handed out).

        A counted record's attempts survive at any distance below ``through``;
        far below it, ``through`` reads back rounded up (see the module's layout).
        """
        if self.through < 0:
            return 0
        counted = 0 <= self.offset <= self.through and self.tries > 0
        tries = min(self.tries, _MAX_TRIES) if counted else 0
        offset = self.offset if counted else self.through
        distance = self.through - offset
        if self.through < _NEAR_THROUGH and distance <= _MAX_DISTANCE:
            return ((self.through + 1) << _SHIFT) | (distance << _TRIES_BITS) | tries
        code = _round_up(distance)
        return _FAR | code << (_TRIES_BITS + _OFFSET_BITS) | tries << _OFFSET_BITS | min(offset, _MAX_OFFSET)

    @classmethod
    def decode(cls, value: int) -> Mark:
        """The mark an :meth:`encode` result stands for (anything <= 0: no mark)."""
        if value <= 0:
            return CLEAN
        if value & _FAR:
            offset = value & _MAX_OFFSET
            tries = (value >> _OFFSET_BITS) & _MAX_TRIES
            code = (value >> (_OFFSET_BITS + _TRIES_BITS)) & ((1 << 9) - 1)
            return cls(offset + _distance(code), offset, tries) if tries else cls(offset + _distance(code))
        through = (value >> _SHIFT) - 1
        tries = value & _MAX_TRIES
        if through < 0:
            return CLEAN
        if not tries:
            return cls(through)
        return cls(through, through - ((value >> _TRIES_BITS) & _MAX_DISTANCE), tries)


CLEAN = Mark()


class MarkStore:
    """Reads and writes the marks of one subscription (and the group's committed offsets).

    Args:
        kafka: the subscription's started group consumer (for its committed offsets).
        shadow: an unstarted ``AIOKafkaConsumer`` whose ``group_id`` is :func:`shadow_group`.
        timeout: seconds a read or write may take before it counts as failed.
    """

    def __init__(self, kafka: AIOKafkaConsumer, shadow: AIOKafkaConsumer, timeout: float) -> None:
        self._kafka = kafka
        self._shadow = shadow
        self._timeout = timeout
        self._started = False

    async def start(self) -> None:
        """Connect the shadow client (it never subscribes, so it never joins its group)."""
        try:
            await self._shadow.start()
        except BaseException:
            await self._shadow.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Disconnect the shadow client; idempotent."""
        if self._started:
            self._started = False
            await self._shadow.stop()

    async def load(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, tuple[int | None, Mark]]:
        """The group's committed offset (None: never committed) and the mark of each partition.

        Raises:
            TransientTransportError: the broker did not answer in time.
        """
        wanted = set(tps)
        committed, marks = await asyncio.gather(
            self._fetch(self._kafka, wanted, "committed offsets"), self._fetch(self._shadow, wanted, "attempt marks")
        )
        found = {tp: Mark.decode(marks[tp].offset) for tp in marks}
        return {tp: (committed[tp].offset if tp in committed else None, found.get(tp, CLEAN)) for tp in wanted}

    async def save(self, marks: dict[TopicPartition, Mark]) -> None:
        """Write marks durably (the broker acknowledged them when this returns).

        Raises:
            TransientTransportError: the write failed or timed out.
        """
        if not marks:
            return
        offsets = {tp: OffsetAndMetadata(mark.encode(), "") for tp, mark in marks.items()}
        try:
            # Private API, in this one place: aiokafka's public commit() only commits
            # partitions assigned to the consumer, and the shadow group has no members.
            # commit_offsets retries retriable errors without end: bound it.
            await asyncio.wait_for(_coordinator(self._shadow).commit_offsets(None, offsets), self._timeout)
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            raise errors.TransientTransportError(f"writing Kafka attempt marks failed: {exc!r}") from exc

    async def _fetch(self, kafka: AIOKafkaConsumer, tps: set[TopicPartition], what: str) -> dict[Any, Any]:
        try:
            # Private API, in this one place: fetch_committed_offsets answers for many
            # partitions in one request and returns the metadata too.
            return dict(await asyncio.wait_for(_coordinator(kafka).fetch_committed_offsets(tps), self._timeout))
        except (kafka_errors.KafkaError, OSError, TimeoutError) as exc:
            raise errors.TransientTransportError(f"reading Kafka {what} failed: {exc!r}") from exc


def generation(kafka: AIOKafkaConsumer) -> int | None:
    """The member's current group generation (-1 once the coordinator forgot the member); None: not known."""
    value = getattr(getattr(kafka, "_coordinator", None), "generation", None)
    return value if isinstance(value, int) else None


def _coordinator(kafka: AIOKafkaConsumer) -> Any:
    coordinator = getattr(kafka, "_coordinator", None)
    if coordinator is None:
        raise errors.TransportError("the Kafka consumer has no group coordinator (not started?)")
    return coordinator
