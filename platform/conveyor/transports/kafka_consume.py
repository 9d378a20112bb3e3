"""The consuming side of the Kafka transport: fetch loop, offsets, delayed redelivery.

One :class:`KafkaConsumer` per subscription runs an ``AIOKafkaConsumer`` in the
subscription's consumer group, subscribed to the Conveyor topic and to the
subscription's retry topic (see :mod:`conveyor.transports.kafka` for the design).

Offsets are tracked and committed by :mod:`conveyor.transports.kafka_offsets`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka import errors as kafka_errors

from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.transports import kafka_offsets

log = logging.getLogger("conveyor.transports.kafka")

MESSAGE_ID_HEADER = "conveyor-message-id"
ATTEMPT_HEADER = "conveyor-attempt"
NOT_BEFORE_HEADER = "conveyor-not-before"
_INTERNAL = frozenset({MESSAGE_ID_HEADER, ATTEMPT_HEADER, NOT_BEFORE_HEADER})

_POLL_SECONDS = 1.0  # longest getmany wait; also how often a full consumer polls
_BACKOFF_MAX = 5.0

Send = Callable[[str, WireMessage, dict[str, str]], Awaitable[None]]
Leave = Callable[[int, str, str], Awaitable[None]]


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

    Args:
        record: the aiokafka record.
        trusted: the record comes from our own retry topic. On a producer's
            topic the attempt and not-before headers are ignored: a producer
            could otherwise skip every retry, or hold a partition for days.
    """
    headers: dict[str, str] = {}
    message_id: str | None = None
    attempt, not_before = 1, 0
    for name, raw in record.headers or ():
        value = raw.decode("utf-8", "replace") if raw is not None else ""
        if name not in _INTERNAL:
            headers[name] = value
        elif name == MESSAGE_ID_HEADER:
            message_id = value
        elif trusted and value.isdigit() and len(value) <= 18:
            if name == ATTEMPT_HEADER:
                attempt = max(int(value), 1)
            else:
                not_before = int(value)
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    body = record.value if record.value is not None else b""
    return WireMessage(body, headers, key, message_id), attempt, not_before


@dataclass(order=True, slots=True)
class _Held:
    """A record taken from its partition but not handed out before ``due`` (epoch seconds)."""

    due: float
    seq: int
    partition: kafka_offsets.PartitionOffsets = field(compare=False)
    offset: int = field(compare=False)
    message: WireMessage = field(compare=False)
    attempt: int = field(compare=False)


class KafkaDelivery:
    """One delivery of a Kafka record to a subscription."""

    __slots__ = ("_consumer", "_offset", "_partition", "_settled", "attempt", "message", "topic")

    def __init__(self, consumer: KafkaConsumer, held: _Held) -> None:
        self._consumer = consumer
        self._partition = held.partition
        self._offset = held.offset
        self._settled = False
        self.topic = consumer.subscription.topic
        self.message = held.message
        self.attempt = held.attempt

    async def ack(self) -> None:
        """Commit the record's offset once every earlier record of its partition is settled.

        Raises:
            TransportError: already settled, or the consumer is closed (the
                record will be redelivered).
            TransientTransportError: the commit failed; the record may be delivered again.
        """
        self._check()
        self._settled = True
        committed = self._consumer.settle(self._partition, self._offset)
        if committed is not None:
            await asyncio.shield(committed)  # shared by the acks of a round

    async def nack(self, delay: float) -> None:
        """Publish a copy with attempt + 1 to the retry topic, then commit the original.

        If the copy cannot be published, the record is redelivered from memory
        after ``delay`` instead (its offset stays uncommitted, so a crash
        meanwhile redelivers it from the topic).

        Raises:
            TransportError: already settled, or the consumer is closed (the
                record will be redelivered).
            TransientTransportError: the commit failed; the record may be delivered again.
        """
        self._check()
        self._settled = True
        consumer = self._consumer
        not_before = time.time() + max(delay, 0.0)
        extra = {ATTEMPT_HEADER: str(self.attempt + 1), NOT_BEFORE_HEADER: str(int(not_before * 1000))}
        try:
            await consumer.send(consumer.retry_topic, self.message, extra)
        except errors.TransportError as exc:
            log.warning(
                "could not publish a retry copy to %s (%s); redelivering from memory in %.1fs",
                consumer.retry_topic, exc, delay,
            )  # fmt: skip
            consumer.hold(self._partition, self._offset, self.message, self.attempt + 1, not_before)
            consumer.release()
            return
        committed = consumer.settle(self._partition, self._offset)
        if committed is not None:
            await asyncio.shield(committed)  # shared by the acks of a round

    def _check(self) -> None:
        if self._settled:
            raise errors.TransportError("delivery already acked or nacked")
        if self._consumer.closed:
            raise errors.TransportError("the Kafka consumer is closed; the message will be redelivered")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._consumer.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._consumer.assigned(assigned)


class KafkaConsumer:
    """A running subscription: one group member fetching, holding and handing out records.

    Args:
        kafka: an unstarted ``AIOKafkaConsumer`` with ``group_id`` = subscription name.
        subscription: the subscription.
        retry_topic: the subscription's retry topic.
        callback: awaited with each delivery.
        send: publishes a wire message with extra headers (for retry copies).
        commit_timeout: seconds one offset commit may take before it counts as failed.
        leave: sends LeaveGroup(node, group, member) for a member aiokafka would not
            take out of the group itself (see :meth:`_close`).
    """

    def __init__(
        self,
        kafka: AIOKafkaConsumer,
        subscription: ports.Subscription,
        retry_topic: str,
        callback: ports.DeliveryCallback,
        send: Send,
        commit_timeout: float,
        leave: Leave,
    ) -> None:
        self.subscription = subscription
        self.retry_topic = retry_topic
        self.send = send
        self.closed = False
        self._kafka = kafka
        self._callback = callback
        self._prefetch = max(subscription.prefetch, 1)
        self._hold_limit = max(self._prefetch * 4, 64)
        self._committer = kafka_offsets.Committer(kafka, subscription.name, commit_timeout)
        self._leave = leave
        self._partitions: dict[TopicPartition, kafka_offsets.PartitionOffsets] = {}
        self._held: list[_Held] = []
        self._seq = itertools.count()
        self._unsettled = 0
        self._room = asyncio.Event()
        self._paused: set[TopicPartition] = set()
        self._full = False
        self._healthy = True  # until the fetch loop fails; active also needs an assignment
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """True while partitions are assigned and the fetch loop is healthy."""
        return self._healthy and bool(self._partitions) and self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Join the group and start the fetch loop (the assignment arrives in the background).

        Raises:
            TransientTransportError: the broker is unreachable.
        """
        self._kafka.subscribe([self.subscription.topic, self.retry_topic], listener=_Listener(self))
        try:
            await self._kafka.start()
        except (kafka_errors.KafkaError, OSError) as exc:
            await self._kafka.stop()
            raise errors.TransientTransportError(
                f"cannot start the Kafka consumer of {self.subscription.name}: {exc!r}"
            ) from exc
        self._task = asyncio.create_task(self._run(), name=f"kafka-consumer:{self.subscription.name}")

    async def stop(self) -> None:
        """Stop fetching; handed-out deliveries may still be settled, then the member leaves."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._held.clear()
        if self._unsettled == 0:
            await self.close()

    async def close(self) -> None:
        """Stop, commit what is settled and leave the group; unsettled records are redelivered."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"kafka-close:{self.subscription.name}")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._committer.flush()
        except errors.TransportError as exc:
            log.warning("final offset commit of %s failed (%s); settled records may be redelivered",
                        self.subscription.name, exc)  # fmt: skip
        self.closed = True
        # aiokafka sends LeaveGroup on stop only for generation > 0, but Tansu
        # numbers a group's first generation 0: without a LeaveGroup the next
        # member waits a session timeout for this one. Send it ourselves then.
        coordinator = getattr(self._kafka, "_coordinator", None)
        node = getattr(coordinator, "coordinator_id", None)
        member = getattr(coordinator, "member_id", "")
        first_generation = getattr(coordinator, "generation", -1) == 0
        await self._kafka.stop()
        if first_generation and member and node is not None:
            try:
                await self._leave(node, self.subscription.name, member)
            except (kafka_errors.KafkaError, OSError) as exc:
                log.info("LeaveGroup for %s failed: %r", self.subscription.name, exc)

    # -- settling (called by deliveries) -------------------------------------

    def settle(self, partition: kafka_offsets.PartitionOffsets, offset: int) -> asyncio.Future[None] | None:
        """Settle ``offset``; return the commit round to wait for if the settled prefix grew.

        Raises:
            TransportError: the consumer is closed.
        """
        if self.closed:
            raise errors.TransportError("the Kafka consumer is closed; the message will be redelivered")
        commit = partition.settle(offset)
        committed = None
        if commit is not None and not partition.revoked:
            committed = self._committer.request(partition.tp, commit)
        self.release()  # after the commit is queued: a close it triggers flushes it first
        return committed

    def release(self) -> None:
        """A delivery left the runtime's hands: free its prefetch slot."""
        self._unsettled -= 1
        self._room.set()
        if self._stopping and self._unsettled == 0 and self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"kafka-close:{self.subscription.name}")

    def hold(
        self, partition: kafka_offsets.PartitionOffsets, offset: int, message: WireMessage, attempt: int, due: float
    ) -> None:
        """Hand the record out again at ``due`` (epoch seconds); its offset stays taken."""
        heapq.heappush(self._held, _Held(due, next(self._seq), partition, offset, message, attempt))
        self._room.set()  # wake a loop waiting for room: it re-reads its timers

    # -- rebalancing (called by the listener) --------------------------------

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is settled before the partitions move; forget their state."""
        try:
            await self._committer.flush()
        except errors.TransportError as exc:
            log.info("commit before rebalance of %s failed: %s", self.subscription.name, exc)
        for tp in revoked:
            partition = self._partitions.pop(tp, None)
            if partition is not None:
                partition.revoked = True
        self._committer.forget(revoked)
        self._paused -= revoked
        if self._held:
            self._held = [h for h in self._held if not h.partition.revoked]
            heapq.heapify(self._held)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """Start tracking newly assigned partitions."""
        for tp in assigned:
            if tp not in self._partitions:
                self._partitions[tp] = kafka_offsets.PartitionOffsets(tp)
        log.debug("%s assigned %s", self.subscription.name, sorted(assigned))

    # -- the fetch loop -------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._step()
            except kafka_errors.ConsumerStoppedError:
                return
            except (kafka_errors.KafkaError, OSError) as exc:
                self._healthy = False
                log.warning("Kafka consumer %s: %r; retrying in %.1fs", self.subscription.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except Exception:
                self._healthy = False
                log.exception("Kafka consumer %s failed; retrying in %.1fs", self.subscription.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            else:
                backoff = 0.1

    async def _step(self) -> None:
        await self._release_due()
        if self._unsettled >= self._prefetch:
            await self._wait_for_room()
            return
        self._full = False
        self._sync_pauses()
        timeout = _POLL_SECONDS
        if self._held:
            timeout = min(timeout, max(self._held[0].due - time.time(), 0.0))
        batch = await self._kafka.getmany(timeout_ms=int(timeout * 1000), max_records=self._prefetch - self._unsettled)
        self._healthy = True
        for tp, records in batch.items():
            partition = self._partitions.get(tp)
            if partition is None:
                continue
            for record in records:
                if partition.revoked:
                    break
                await self._accept(partition, record)

    async def _wait_for_room(self) -> None:
        """At the prefetch limit: wait for a settle, polling paused so the member stays alive."""
        self._room.clear()
        due = self._held[0].due - time.time() if self._held else _POLL_SECONDS
        try:
            await asyncio.wait_for(self._room.wait(), min(_POLL_SECONDS, max(due, 0.01)))
        except TimeoutError:
            if self._unsettled >= self._prefetch:
                # Slow handlers: pause everything and poll, so max_poll_interval_ms
                # never expires while deliveries are out (no endless rebalances).
                self._full = True
                self._sync_pauses()
                await self._kafka.getmany(timeout_ms=0)
                self._healthy = True

    def _sync_pauses(self) -> None:
        if self._full:
            wanted = set(self._partitions)
        elif len(self._held) >= self._hold_limit:
            wanted = {tp for tp in self._partitions if tp.topic == self.retry_topic}
        else:
            wanted = set()
        if wanted == self._paused:
            return
        if resume := self._paused - wanted:
            self._kafka.resume(*(tp for tp in resume if tp in self._partitions))
        if pause := wanted - self._paused:
            self._kafka.pause(*pause)
        self._paused = wanted

    async def _accept(self, partition: kafka_offsets.PartitionOffsets, record: Any) -> None:
        message, attempt, not_before = from_record(record, trusted=record.topic == self.retry_topic)
        partition.take(record.offset)
        held = _Held(not_before / 1000, next(self._seq), partition, record.offset, message, attempt)
        if not_before and held.due > time.time():
            heapq.heappush(self._held, held)
        else:
            await self._hand_out(held)

    async def _release_due(self) -> None:
        now = time.time()
        while self._held and self._held[0].due <= now and self._unsettled < self._prefetch:
            held = heapq.heappop(self._held)
            if not held.partition.revoked:
                await self._hand_out(held)

    async def _hand_out(self, held: _Held) -> None:
        delivery = KafkaDelivery(self, held)
        self._unsettled += 1
        try:
            await self._callback(delivery)
        except asyncio.CancelledError:
            if not delivery._settled:  # not accepted: stopping; the offset stays uncommitted
                self._unsettled -= 1
                delivery._settled = True
            raise
        except Exception:
            log.exception("delivery callback of %s failed; redelivering in 1s", self.subscription.name)
            if not delivery._settled:
                delivery._settled = True
                self._unsettled -= 1
                self.hold(held.partition, held.offset, held.message, held.attempt, time.time() + 1.0)
