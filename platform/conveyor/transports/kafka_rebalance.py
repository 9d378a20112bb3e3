"""Rebalancing of the Kafka consumer: taking partitions over and handing them over.

A mixin of :class:`~conveyor.transports.kafka_consume.KafkaConsumer` (it uses
the consumer's state, declared below), kept apart because rebalancing is its
own concern: aiokafka awaits :meth:`Rebalancing.revoked` before the member
rejoins its group and :meth:`Rebalancing.assigned` once it has new partitions.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.transports import kafka_attempts, kafka_delivery, kafka_marks, kafka_offsets

if TYPE_CHECKING:
    from conveyor.transports.kafka_consume import KafkaConsumer

log = logging.getLogger("conveyor.transports.kafka")


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Passes aiokafka's rebalance callbacks to the consumer."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._consumer.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._consumer.assigned(assigned)


class Rebalancing:
    """Revocation and assignment of partitions (a mixin of ``KafkaConsumer``)."""

    subscription: ports.Subscription
    closed: bool
    _kafka: AIOKafkaConsumer
    _partitions: dict[TopicPartition, kafka_offsets.PartitionOffsets]
    _committer: kafka_offsets.Committer
    _attempts: kafka_attempts.Attempts
    _revoke_grace: float
    _held: list[kafka_delivery.Held]
    _handing: kafka_delivery.KafkaDelivery | None
    _drop_handing: bool
    _draining: set[TopicPartition]
    _drained: asyncio.Event
    _paused: set[TopicPartition]
    _task: asyncio.Task[None] | None

    def _sync_pauses(self) -> None:
        raise NotImplementedError  # the consumer's

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Hand the partitions over: stop dispatch, let what is out settle, commit, drop the rest.

        Awaited by aiokafka before the member rejoins, so the group waits for it:
        the wait for deliveries to settle and the final commit are bounded by
        ``revoke_grace`` each. Records held or not handed out yet are dropped;
        deliveries still unsettled after the grace are dropped too (their ack or
        nack commits and publishes nothing, see :meth:`settle`), and attempts of
        them still running are cancelled; the revocation waits, up to the grace
        again, for them to end, so they do not overlap the partitions' next
        owner. The partitions' next owner redelivers everything not committed;
        the inbox absorbs the duplicates of what was handled here but not committed.
        """
        partitions = [p for tp in revoked if (p := self._partitions.get(tp)) is not None]
        started = time.monotonic()
        try:
            self._stop_dispatch(partitions)
            await self._settle_out(partitions)
            await self._take_back(partitions)
            try:
                await asyncio.wait_for(self._committer.flush(), self._revoke_grace)
            except (errors.TransportError, TimeoutError) as exc:
                log.warning("commit before a rebalance of %s failed (%r); the new owners redeliver those records",
                            self.subscription.name, exc)  # fmt: skip
            if not self.closed:
                await self._attempts.hand_over(partitions)
        finally:  # also when cancelled (the consumer is closing): never leave partitions half revoked
            dropped = sum(p.out for p in partitions)
            for partition in partitions:
                partition.revoked = True
                self._partitions.pop(partition.tp, None)
            self._committer.forget(revoked)
            self._paused -= revoked
            self._draining -= revoked
        if partitions:
            log.info(
                "%s handed over %d partition(s) in %.3fs; %d unsettled deliveries left to the new owners",
                self.subscription.name, len(partitions), time.monotonic() - started, dropped,
            )  # fmt: skip

    def _stop_dispatch(self, partitions: list[kafka_offsets.PartitionOffsets]) -> None:
        for partition in partitions:
            partition.draining = True
            self._draining.add(partition.tp)
        if self._held:
            self._held = [h for h in self._held if not h.partition.draining]
            heapq.heapify(self._held)
        self._sync_pauses()  # fetching records only to drop them is pointless
        handing, task = self._handing, self._task
        if handing is not None and not handing._settled and handing._partition.draining and task is not None:
            # The callback has not accepted the delivery yet (a full dispatcher): take it back.
            self._drop_handing = task.cancel()

    async def _settle_out(self, partitions: list[kafka_offsets.PartitionOffsets]) -> None:
        """Wait, up to the grace, until no delivery of ``partitions`` is out."""
        try:
            async with asyncio.timeout(self._revoke_grace):
                while any(p.out for p in partitions):
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            pass

    async def _take_back(self, partitions: list[kafka_offsets.PartitionOffsets]) -> None:
        """Cancel the attempts of ``partitions`` still running; wait, up to the grace, for them to end.

        A task also running deliveries of partitions kept here (a batch) loses
        them too: they are redelivered from memory at once.
        """
        late = [delivery for partition in partitions for delivery in list(partition.claimed.values())]
        tasks = {d.task for d in late if d.task is not None and not d.task.done()}
        if not tasks:
            return
        for partition in self._partitions.values():
            for delivery in list(partition.claimed.values()) if not partition.draining else ():
                if delivery.task in tasks:
                    delivery.take_back()
                    self.hold(partition, delivery._offset, delivery.message, delivery.attempt, time.time())
        for delivery in late:
            delivery.take_back()
        log.warning(
            "%s: %d attempt(s) still running after the revocation grace of %.1fs; cancelled",
            self.subscription.name, len(late), self._revoke_grace,
        )  # fmt: skip
        try:
            async with asyncio.timeout(self._revoke_grace):
                for delivery in late:
                    await delivery.ended.wait()
        except TimeoutError:
            stuck = sum(1 for d in late if not d.ended.is_set())
            log.error(
                "%s: %d cancelled attempt(s) still running (a handler ignoring cancellation); they may "
                "overlap the partitions' new owner", self.subscription.name, stuck,
            )  # fmt: skip

    def hold(
        self, partition: kafka_offsets.PartitionOffsets, offset: int, message: WireMessage, attempt: int, due: float
    ) -> None:
        raise NotImplementedError  # the consumer's

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """Start tracking newly assigned partitions, recovering those whose owner died.

        They stay paused until their committed offsets and attempt marks are
        read (aiokafka awaits this before the member rejoins the fetch).
        """
        generation = kafka_marks.generation(self._kafka)
        new = [kafka_offsets.PartitionOffsets(tp, generation) for tp in assigned if tp not in self._partitions]
        self._partitions.update((p.tp, p) for p in new)
        self._sync_pauses()
        log.debug("%s assigned %s", self.subscription.name, sorted(assigned))
        await self._attempts.restore(new)
