"""The consuming side of the Kafka transport: fetch loop, offsets, delayed redelivery.

One :class:`KafkaConsumer` per subscription runs an ``AIOKafkaConsumer`` in the
subscription's consumer group, subscribed to the Conveyor topic and to the
subscription's retry topic (see :mod:`conveyor.transports.kafka` for the design).

Offsets are tracked and committed by :mod:`conveyor.transports.kafka_offsets`;
records become deliveries in :mod:`conveyor.transports.kafka_delivery`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors

from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.transports import (
    kafka_attempts,
    kafka_delivery,
    kafka_marks,
    kafka_offsets,
    kafka_rebalance,
    kafka_salvage,
)

log = logging.getLogger("conveyor.transports.kafka")

_POLL_SECONDS = 1.0  # longest getmany wait; also how often a full consumer polls
_BACKOFF_MAX = 5.0
_STOP_SECONDS = 15.0  # longest wait for aiokafka to stop a consumer
_MARK_LOOKAHEAD = 4  # attempt marks reach this many prefetches past the records handed out...
_MARK_LOOKAHEAD_MAX = 128  # ...but no farther: after a crash, the records past those out are recovered one by one

Send = kafka_delivery.Send
Leave = Callable[[int, str, str], Awaitable[None]]


class KafkaConsumer(kafka_rebalance.Rebalancing, kafka_salvage.Salvaging):
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
        revoke_grace: seconds a revocation waits for handed-out deliveries of the
            revoked partitions to settle (and again, at most, for their commit).
        marks: where attempt marks are kept (see :mod:`conveyor.transports.kafka_marks`);
            None counts no attempts across crashes.
        send_record: publishes a record as given, for dead letters of records the
            client cannot decode (see :mod:`conveyor.transports.kafka_salvage`).
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
        *,
        revoke_grace: float = 2.5,
        marks: kafka_marks.MarkStore | None = None,
        send_record: kafka_salvage.SendRecord | None = None,
    ) -> None:
        self.subscription = subscription
        self.retry_topic = retry_topic
        self.send = send
        self.closed = False
        self._kafka = kafka
        self._callback = callback
        self._send_record = send_record
        self._request_timeout = commit_timeout
        self._prefetch = max(subscription.prefetch, 1)
        self._low_water = self._prefetch // 2  # once full, fetch again only below this: whole batches, not ones
        self._topping = False
        self._hold_limit = max(self._prefetch * 4, 64)
        self._committer = kafka_offsets.Committer(kafka, subscription.name, commit_timeout)
        self._leave = leave
        self._revoke_grace = revoke_grace
        lookahead = min(self._prefetch * _MARK_LOOKAHEAD, _MARK_LOOKAHEAD_MAX)
        self._attempts = kafka_attempts.Attempts(kafka, marks, subscription.name, revoke_grace, lookahead)
        self._partitions: dict[TopicPartition, kafka_offsets.PartitionOffsets] = {}
        self._held: list[kafka_delivery.Held] = []
        self._handing: kafka_delivery.KafkaDelivery | None = None  # being handed to the callback
        self._drop_handing = False  # a revocation cancelled that hand-out
        self._draining: set[TopicPartition] = set()
        self._drained = asyncio.Event()  # a draining partition has nothing out any more
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
        self._kafka.subscribe([self.subscription.topic, self.retry_topic], listener=kafka_rebalance.Listener(self))
        try:
            await self._attempts.start()
            await self._kafka.start()
        except (kafka_errors.KafkaError, OSError) as exc:
            await self._kafka.stop()
            await self._attempts.stop()
            raise errors.TransientTransportError(
                f"cannot start the Kafka consumer of {self.subscription.name}: {exc!r}"
            ) from exc
        self._task = asyncio.create_task(self._run(), name=f"kafka-consumer:{self.subscription.name}")

    async def stop(self) -> None:
        """Stop fetching; handed-out deliveries may still be settled, then the member leaves."""
        self._stopping = True
        await self._end_fetching()
        self._held.clear()
        if self._unsettled == 0:
            await self.close()

    async def close(self) -> None:
        """Stop, commit what is settled and leave the group; unsettled records are redelivered."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"kafka-close:{self.subscription.name}")
        await asyncio.shield(self._closing)

    async def _end_fetching(self) -> None:
        """Cancel the fetch loop and wait until it has ended (call with :attr:`_stopping` set).

        A cancellation can be lost: Python 3.11's ``asyncio.wait_for`` returns
        the awaited result instead of raising when the cancellation arrives as
        that result does (aiokafka uses it too). The loop also ends at its next
        step once it sees :attr:`_stopping`, and is cancelled again each
        :data:`_POLL_SECONDS` until it is done, so a stop never waits for ever.
        """
        task = self._task
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_POLL_SECONDS)

    async def _close(self) -> None:
        self._stopping = True
        await self._end_fetching()
        try:
            await self._committer.flush()
        except errors.TransportError as exc:
            log.warning("final offset commit of %s failed (%s); settled records may be redelivered",
                        self.subscription.name, exc)  # fmt: skip
        self._committer.stop()
        await self._attempts.hand_over(self._partitions.values())
        self.closed = True
        # aiokafka sends LeaveGroup on stop only for generation > 0, but Tansu
        # numbers a group's first generation 0: without a LeaveGroup the next
        # member waits a session timeout for this one. Send it ourselves then.
        coordinator = getattr(self._kafka, "_coordinator", None)
        node = getattr(coordinator, "coordinator_id", None)
        member = getattr(coordinator, "member_id", "")
        first_generation = getattr(coordinator, "generation", -1) == 0
        for name, stopping in (("consumer", self._kafka.stop), ("attempt marks", self._attempts.stop)):
            # A client stuck in a rebalance must not hold the process's shutdown for ever: past the
            # bound it is cancelled and left behind, not awaited (asyncio.wait_for would wait for
            # the cancellation to finish, however long the client takes to honour it).
            task = asyncio.ensure_future(stopping())
            await asyncio.wait({task}, timeout=_STOP_SECONDS)
            if task.done():
                task.result()
            else:
                task.cancel()
                log.warning("the Kafka %s of %s did not stop within %.0fs; left behind",
                            name, self.subscription.name, _STOP_SECONDS)  # fmt: skip
        if first_generation and member and node is not None:
            try:
                await self._leave(node, self.subscription.name, member)
            except (kafka_errors.KafkaError, OSError) as exc:
                log.info("LeaveGroup for %s failed: %r", self.subscription.name, exc)

    # -- settling (called by deliveries) -------------------------------------

    def settle(self, partition: kafka_offsets.PartitionOffsets, offset: int) -> None:
        """Settle ``offset``; if its partition's settled prefix grew, queue the commit (in the background).

        Raises:
            TransportError: the consumer is closed, or the partition was revoked
                (nothing is committed; its new owner redelivers the record).
        """
        if self.closed:
            raise errors.TransportError("the Kafka consumer is closed; the message will be redelivered")
        if partition.revoked:
            raise self.drop(partition)
        commit = partition.settle(offset)
        if commit is not None:
            self._committer.request(partition.tp, commit)
        self.release(partition)  # after the commit is queued: a close or drain it ends flushes it

    def drop(self, partition: kafka_offsets.PartitionOffsets) -> errors.TransportError:
        """Release a delivery of a revoked partition; return the error its ack or nack raises."""
        self.release(partition)
        tp = partition.tp
        return errors.TransportError(
            f"Kafka partition {tp.topic}[{tp.partition}] was revoked in a rebalance; "
            "its new owner redelivers the message"
        )

    def release(self, partition: kafka_offsets.PartitionOffsets) -> None:
        """A delivery left the runtime's hands: free its prefetch slot."""
        self._forget(partition)
        if self._stopping and self._unsettled == 0 and self._closing is None:
            self._closing = asyncio.create_task(self._close(), name=f"kafka-close:{self.subscription.name}")

    def _forget(self, partition: kafka_offsets.PartitionOffsets) -> None:
        self._unsettled -= 1
        partition.out -= 1
        if self._unsettled <= self._low_water:  # the fetch loop waits for this much room (see _wait_for_room)
            self._room.set()
        if partition.draining and not partition.out:
            self._drained.set()
        if partition.suspect >= 0 and not partition.out and not partition.revoked and not self._stopping:
            self._sync_pauses()  # the next recovered record may go out now

    def hold(
        self, partition: kafka_offsets.PartitionOffsets, offset: int, message: WireMessage, attempt: int, due: float
    ) -> None:
        """Hand the record out again at ``due`` (epoch seconds); its offset stays taken.

        A record of a partition being revoked is not held: the next owner redelivers it.
        """
        if partition.draining:
            return
        heapq.heappush(self._held, kafka_delivery.Held(due, next(self._seq), partition, offset, message, attempt))
        self._room.set()  # wake a loop waiting for room: it re-reads its timers

    # -- the fetch loop -------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:  # also when a stop's cancellation was lost (see _end_fetching)
            try:
                await self._step()
            except kafka_errors.ConsumerStoppedError:
                return
            except (kafka_errors.KafkaError, OSError, errors.TransportError) as exc:
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
        if self._unsettled >= self._prefetch or (self._topping and self._unsettled > self._low_water):
            self._topping = True
            await self._wait_for_room()
            return
        self._full = self._topping = False
        await self._attempts.end_recoveries(p for p in self._partitions.values() if not p.out)
        self._sync_pauses()
        timeout = _POLL_SECONDS
        if self._held:
            timeout = min(timeout, max(self._held[0].due - time.time(), 0.0))
        batch = await self._getmany(timeout_ms=int(timeout * 1000), max_records=self._prefetch - self._unsettled)
        self._healthy = True
        batch = self._one_recovered(batch)
        await self._attempts.mark(batch, self._partitions)
        for tp, records in batch.items():
            partition = self._partitions.get(tp)
            if partition is None:
                continue
            for record in records:
                if partition.draining or self._stopping:  # revoked or stopping: the next owner fetches the rest
                    break
                await self._accept(partition, record, count=partition.suspect >= record.offset)

    def _one_recovered(self, batch: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """Keep one record of a partition being recovered (its first); the rest is fetched again later.

        A partition read past its recovered records is recovered: its records take the normal path.
        """
        for tp, records in batch.items():
            partition = self._partitions.get(tp)
            if partition is None or partition.suspect < 0 or not records:
                continue
            if records[0].offset > partition.suspect:
                partition.suspect = -1
                log.info("%s: recovered %s[%d]", self.subscription.name, tp.topic, tp.partition)
            elif len(records) > 1:
                self._seek(tp, records[0].offset + 1)
                batch[tp] = records[:1]
        return batch

    async def _wait_for_room(self) -> None:
        """At the prefetch limit: wait for a settle, polling paused so the member stays alive.

        The fetch loop resumes once half the prefetch is free (:attr:`_low_water`): one
        ``getmany`` per settled record, each taking one record, would cost more than the records.
        """
        self._room.clear()
        due = self._held[0].due - time.time() if self._held else _POLL_SECONDS
        try:
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation (a stop) arriving as room is made.
            async with asyncio.timeout(min(_POLL_SECONDS, max(due, 0.01))):
                await self._room.wait()
        except TimeoutError:
            if self._unsettled > self._low_water:
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
            wanted = {tp for tp in self._partitions if tp.topic == self.retry_topic} | self._draining
        else:
            wanted = set(self._draining)
        # Partitions being recovered hand out one record at a time, one partition at a time: at most one
        # recovered record is out (others go on), so a crash is counted against that record.
        recovering = [p for p in self._partitions.values() if p.suspect >= 0 and not p.loading and not p.draining]
        if recovering:
            current = None if any(p.out for p in recovering) else recovering[0].tp
            wanted.update(p.tp for p in recovering if p.tp != current)
        wanted.update(tp for tp, p in self._partitions.items() if p.loading)
        if wanted == self._paused:
            return
        if resume := self._paused - wanted:
            self._kafka.resume(*(tp for tp in resume if tp in self._partitions))
        if pause := wanted - self._paused:
            self._kafka.pause(*pause)
        self._paused = wanted

    async def _accept(self, partition: kafka_offsets.PartitionOffsets, record: Any, *, count: bool = False) -> None:
        if isinstance(record, kafka_salvage.RawRecord) and record.undecodable:
            await self.quarantine(partition, record)
            return
        message, attempt, not_before = kafka_delivery.from_record(record, trusted=record.topic == self.retry_topic)
        offset = record.offset
        if not_before and not_before / 1000 > time.time():  # not due: it cannot have run before either
            partition.take(offset)
            held = kafka_delivery.Held(not_before / 1000, next(self._seq), partition, offset, message, attempt)
            heapq.heappush(self._held, held)
            return
        if count:
            tries = await self._attempts.count(partition, offset)
            if not tries:  # its partition is being revoked: the next owner counts and runs it
                return
            attempt = max(attempt, tries)
        partition.take(offset)
        await self._hand_out(kafka_delivery.KafkaDelivery(self, partition, offset, message, attempt))

    async def _release_due(self) -> None:
        now = time.time()
        while self._held and self._held[0].due <= now and self._unsettled < self._prefetch:
            held = heapq.heappop(self._held)
            if not held.partition.draining:
                delivery = kafka_delivery.KafkaDelivery(self, held.partition, held.offset, held.message, held.attempt)
                await self._hand_out(delivery)

    async def _hand_out(self, delivery: kafka_delivery.KafkaDelivery) -> None:
        partition = delivery._partition
        self._unsettled += 1
        partition.out += 1
        self._handing = delivery
        try:
            await self._callback(delivery)
        except asyncio.CancelledError:
            if not delivery._settled:  # not accepted: the offset stays uncommitted
                delivery._settled = True
                self._forget(partition)
            if self._drop_handing:
                self._drop_handing = False
                task = asyncio.current_task()
                if task is not None and task.uncancel() == 0:
                    return  # a revocation took the record back; the fetch loop goes on
            raise
        except Exception:
            log.exception("delivery callback of %s failed; redelivering in 1s", self.subscription.name)
            if not delivery._settled:
                delivery._settled = True
                self._forget(partition)
                self.hold(partition, delivery._offset, delivery.message, delivery.attempt, time.time() + 1.0)
        finally:
            self._handing = None
            if self._drop_handing:  # the callback swallowed the cancellation and accepted the delivery
                self._drop_handing = False
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
