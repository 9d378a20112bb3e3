"""Kafka records as deliveries: CloudEvents-binding headers, attempts, and settling one delivery.

:func:`record_headers` and :func:`from_record` map wire messages to records and
back (the ``conveyor-*`` headers carry the message id, the attempt and the
not-before time of a retry copy). A :class:`KafkaDelivery` settles through its
:class:`~conveyor.transports.kafka_consume.KafkaConsumer`, which owns the offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor import errors
from conveyor.envelope import WireMessage
from conveyor.transports import kafka_offsets

if TYPE_CHECKING:
    from conveyor.transports.kafka_consume import KafkaConsumer

log = logging.getLogger("conveyor.transports.kafka")

MESSAGE_ID_HEADER = "conveyor-message-id"
ATTEMPT_HEADER = "conveyor-attempt"
NOT_BEFORE_HEADER = "conveyor-not-before"

Send = Callable[[str, WireMessage, dict[str, str]], Awaitable[None]]


def record_headers(message: WireMessage, extra: dict[str, str] | None = None) -> list[tuple[str, bytes]]:
    """Kafka record headers for a wire message (plus transport headers)."""
    headers = [(name, value.encode()) for name, value in message.headers.items()]
    if message.message_id is not None:
        headers.append((MESSAGE_ID_HEADER, message.message_id.encode()))
    if extra:
        headers.extend((name, value.encode()) for name, value in extra.items())
    return headers


def from_record(record: Any, *, trusted: bool = True) -> tuple[WireMessage, int, int]:
    """Wire message, attempt and not-before time (epoch ms, 0 = now) of a consumed record.

    The message id is the ``conveyor-message-id`` header, else
    ``<topic>/<partition>/<offset>``: the same on every redelivery of the
    record, and carried by its retry copies.

    Args:
        record: the aiokafka record.
        trusted: the record comes from our own retry topic. On a producer's
            topic the attempt and not-before headers are ignored: a producer
            could otherwise skip every retry, or hold a partition for days.
    """
    try:  # the common case, a third faster than decoding each value tolerantly
        headers = {name: raw.decode() for name, raw in record.headers or ()}
    except (AttributeError, UnicodeDecodeError):  # a None value, or bytes that are not UTF-8
        headers = {name: raw.decode("utf-8", "replace") if raw else "" for name, raw in record.headers}
    attempt, not_before = 1, 0
    message_id = headers.pop(MESSAGE_ID_HEADER, None)
    if ATTEMPT_HEADER in headers or NOT_BEFORE_HEADER in headers:  # a retry copy (or a producer's forgery)
        value = headers.pop(ATTEMPT_HEADER, "")
        if trusted and value.isdigit() and len(value) <= 18:
            attempt = max(int(value), 1)
        value = headers.pop(NOT_BEFORE_HEADER, "")
        if trusted and value.isdigit() and len(value) <= 18:
            not_before = int(value)
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    body = record.value if record.value is not None else b""
    if not message_id:  # a producer's record without our header: its position identifies it
        message_id = f"{record.topic}/{record.partition}/{record.offset}"
    return WireMessage(body, headers, key, message_id), attempt, not_before


@dataclass(order=True, slots=True)
class Held:
    """A record taken from its partition but not handed out before ``due`` (epoch seconds)."""

    due: float
    seq: int
    partition: kafka_offsets.PartitionOffsets = field(compare=False)
    offset: int = field(compare=False)
    message: WireMessage = field(compare=False)
    attempt: int = field(compare=False)


class KafkaDelivery:
    """One delivery of a Kafka record to a subscription."""

    __slots__ = ("_consumer", "_offset", "_partition", "_settled", "_task", "attempt", "ended", "message", "taken_back",
                 "topic")  # fmt: skip

    def __init__(
        self,
        consumer: KafkaConsumer,
        partition: kafka_offsets.PartitionOffsets,
        offset: int,
        message: WireMessage,
        attempt: int,
    ) -> None:
        self._consumer = consumer
        self._partition = partition
        self._offset = offset
        self._settled = False
        self._task: asyncio.Task[object] | None = None
        self.topic = consumer.subscription.topic
        self.message = message
        self.attempt = attempt
        self.taken_back = False
        """True once the consumer cancelled the attempt: it is no longer this member's to settle."""
        self.ended = asyncio.Event()
        """Set once a taken-back attempt ended (by the runtime, or when its task is done)."""

    def claim(self) -> bool:
        """Called by the runtime right before the handler starts; False: skip the delivery.

        False once the record's partition is being revoked or was revoked, or
        the consumer closed: its next owner runs it, so the delivery is
        released without being settled (acking or nacking it afterwards raises
        ``TransportError``). True otherwise; the attempt is then *running* in
        the calling task: if the member lets the partition go before it settles,
        the attempt counts (see :mod:`conveyor.transports.kafka_attempts`), and
        once the revocation grace is over the task is cancelled and
        :attr:`taken_back` set (see :meth:`take_back`).
        """
        partition = self._partition
        if self._settled or partition.draining or partition.revoked or self._consumer.closed:
            if not self._settled:
                self._settled = True
                self._consumer.release(partition)
            return False
        partition.running[self._offset] = self.attempt
        partition.claimed[self._offset] = self
        self._task = asyncio.current_task()
        return True

    @property
    def task(self) -> asyncio.Task[object] | None:
        """The task running the attempt (set by :meth:`claim`)."""
        return self._task

    def take_back(self) -> None:
        """Stop a running attempt: release the delivery unsettled and cancel its task.

        Its ack or nack then raises ``TransportError`` and commits and publishes
        nothing; the runtime sees :attr:`taken_back` and ends the attempt
        quietly. A delivery already settled is left alone.
        """
        if self._settled:
            self.ended.set()
            return
        self._settled = self.taken_back = True
        self._partition.claimed.pop(self._offset, None)
        self._consumer.release(self._partition)
        task = self._task
        if task is None or task.done():
            self.ended.set()
            return
        task.add_done_callback(lambda _: self.ended.set())
        task.cancel()

    async def ack(self) -> None:
        """Settle the record; returns at once, its offset is committed in the background.

        The offset is committed once every earlier record of its partition is
        settled; a crash before that commit redelivers the record (at-least-once),
        a revocation or a close commits it before the partition is let go.

        Raises:
            TransportError: already settled, or the consumer is closed or its
                partition was revoked (the record will be redelivered).
        """
        self._check()
        self._settled = True
        self._partition.finish(self._offset)
        self._consumer.settle(self._partition, self._offset)

    async def nack(self, delay: float) -> None:
        """Publish a copy with attempt + 1 to the retry topic, then settle the original (as :meth:`ack`).

        If the copy cannot be published, the record is redelivered from memory
        after ``delay`` instead (its offset stays uncommitted, so a crash
        meanwhile redelivers it from the topic). Once its partition is being
        revoked it is left to the partition's next owner instead; once it was
        revoked, no copy is published at all.

        Raises:
            TransportError: already settled, or the consumer is closed or its
                partition was revoked (the record will be redelivered).
        """
        self._check()
        self._settled = True
        consumer, partition = self._consumer, self._partition
        partition.finish(self._offset)
        if partition.revoked:  # the new owner redelivers the record: a copy would run it twice
            raise consumer.drop(partition)
        not_before = time.time() + max(delay, 0.0)
        extra = {ATTEMPT_HEADER: str(self.attempt + 1), NOT_BEFORE_HEADER: str(int(not_before * 1000))}
        try:
            await consumer.send(consumer.retry_topic, self.message, extra)
        except errors.TransportError as exc:
            log.warning(
                "could not publish a retry copy to %s (%s); redelivering it in %.1fs (from memory, "
                "or its partition's next owner from the topic)",
                consumer.retry_topic, exc, delay,
            )  # fmt: skip
            consumer.hold(partition, self._offset, self.message, self.attempt + 1, not_before)
            consumer.release(partition)
            return
        consumer.settle(partition, self._offset)

    def _check(self) -> None:
        if self._settled:
            raise errors.TransportError("delivery already acked or nacked")
        if self._consumer.closed:
            raise errors.TransportError("the Kafka consumer is closed; the message will be redelivered")
