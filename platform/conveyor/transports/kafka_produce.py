"""The producing side of the Kafka transport: pipelined sends with per-message results.

A :class:`Producer` wraps one started ``AIOKafkaProducer``. A send *enqueues*
the record in aiokafka's accumulator (``producer.send``), which returns the
record's delivery future; the caller awaits that future for the broker's
acknowledgement (``acks="all"``). One send enqueues at a time, the others wait
their turn in call order (a FIFO lock; ``publish_many`` enqueues all its records
in one turn), so records of one partition (one topic and key) reach the broker
in the order given, and a full batch has one waiter rather than every
concurrent publish: aiokafka wakes all of a full batch's waiters at each drain,
and a thousand concurrent publishes collapsed to a few thousand a second that way.

Batching: the accumulator collects records of a partition into batches of up to
``max_batch_size`` bytes; aiokafka sends a batch when it is full or
``linger_ms`` old, one request in flight per partition (later records gather
in the next batch meanwhile). Waiting out the linger would add its whole
length to a publish that nothing else follows, so once no send waits for its
turn the open batches are *sealed*: their linger ends and aiokafka's sender
takes them as soon as their partition has no request in flight. A lone publish
goes out at once; ``linger_ms`` bounds the wait only while sends queue.

Sealing uses aiokafka internals (the accumulator's batches and its sender
wake-up, as aiokafka's own ``flush_for_commit`` does); if they change, it
quietly does nothing and the linger applies as configured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors

from conveyor import errors
from conveyor.envelope import WireMessage
from conveyor.transports import kafka_delivery

log = logging.getLogger("conveyor.transports.kafka")

_FAILURES = (kafka_errors.KafkaError, OSError)


def translate(exc: BaseException, what: str) -> errors.TransportError:
    """A driver error as a Conveyor one: transient when retrying may help."""
    transient = isinstance(exc, OSError | TimeoutError | kafka_errors.KafkaTimeoutError) or getattr(
        exc, "retriable", False
    )
    kind = errors.TransientTransportError if transient else errors.TransportError
    return kind(f"{what}: {exc!r}")


def _refused(topic: str, exc: BaseException) -> errors.TransportError:
    return translate(exc, f"publish to Kafka topic {topic!r} failed")


class Producer:
    """Pipelined sends on one started ``AIOKafkaProducer``.

    Args:
        producer: the started producer (``acks="all"``).
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._enqueueing = 0  # sends between their start and their record's enqueueing
        # One sender in aiokafka's accumulator at a time, the others queue here in call
        # order: a full batch then has one waiter, not every concurrent publish, each woken
        # at every drain to find the next batch full too (thousands collapse to ~2k/s).
        self._turn = asyncio.Lock()

    async def send(self, topic: str, message: WireMessage, extra: dict[str, str]) -> None:
        """Send one record and return once the broker acknowledged it.

        Raises:
            TransportError: the broker refused the record.
            TransientTransportError: the broker is unreachable or did not answer in time.
        """
        key = message.key.encode() if message.key is not None else None
        await self.send_record(topic, message.body, key, kafka_delivery.record_headers(message, extra))

    async def send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]
    ) -> None:
        """Send one record as given (key, value and header values byte for byte); return once acknowledged.

        Raises:
            TransportError: the broker refused the record.
            TransientTransportError: the broker is unreachable or did not answer in time.
        """
        self._enqueueing += 1
        try:
            async with self._turn:
                delivered = await self._enqueue_record(topic, value, key, headers)
        except _FAILURES as exc:
            raise _refused(topic, exc) from exc
        finally:
            self._enqueueing -= 1
            self._seal_when_idle()
        try:
            await delivered
        except _FAILURES as exc:
            raise _refused(topic, exc) from exc

    async def send_many(self, records: Sequence[tuple[str, WireMessage] | Exception]) -> list[Exception | None]:
        """Enqueue every record in order, then wait for all their acknowledgements.

        Args:
            records: ``(topic, message)`` to send, or the error a message was
                already refused with (kept in its place in the result).

        Returns:
            Per record, in order: None once the broker acknowledged it, else the
            :class:`~conveyor.errors.TransportError` (or the given error).
        """
        results: list[Exception | None] = [None] * len(records)
        waiting: list[tuple[int, str, asyncio.Future[Any]]] = []
        self._enqueueing += 1
        try:
            async with self._turn:  # the records stay together, in order
                for index, record in enumerate(records):
                    if isinstance(record, Exception):
                        results[index] = record
                        continue
                    topic, message = record
                    try:
                        waiting.append((index, topic, await self._enqueue(topic, message, {})))
                    except _FAILURES as exc:
                        results[index] = _refused(topic, exc)
        finally:
            self._enqueueing -= 1
            self._seal_when_idle()
        outcomes = await asyncio.gather(*(future for _, _, future in waiting), return_exceptions=True)
        for (index, topic, _), outcome in zip(waiting, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # a cancellation
                results[index] = _refused(topic, outcome)
        return results

    async def _enqueue(self, topic: str, message: WireMessage, extra: dict[str, str]) -> asyncio.Future[Any]:
        key = message.key.encode() if message.key is not None else None
        return await self._enqueue_record(topic, message.body, key, kafka_delivery.record_headers(message, extra))

    async def _enqueue_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await self.producer.send(topic, value, key=key, headers=list(headers))
        return future

    def _seal_when_idle(self) -> None:
        """End the linger of the open batches once no other send is being enqueued."""
        if self._enqueueing:
            return
        try:
            accumulator = self.producer._message_accumulator
            sealed = False
            for batches in accumulator._batches.values():
                # Not closed: a batch of a partition with a request in flight keeps
                # taking records until the sender can take it (that is batching too).
                if batches and batches[-1]._linger_time:
                    batches[-1]._linger_time = 0.0
                    sealed = True
            waiter = accumulator._waiter_future
            if sealed and not waiter.done():
                waiter.set_result(None)  # wake the sender: those batches are ready
        except AttributeError:  # aiokafka changed its internals: the linger applies
            log.debug("cannot end the linger of aiokafka batches; records wait out linger_ms", exc_info=True)
