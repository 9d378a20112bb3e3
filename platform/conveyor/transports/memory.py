"""The in-memory transport: the reference implementation of the Transport port.

A :class:`MemoryBroker` lives inside one process (``memory://`` names the
default one, ``memory://NAME`` another); every :class:`MemoryTransport` of that
process with the same URL talks to it. It behaves like a small broker:

* each subscription name is a group: its consumers compete for messages,
  and each group receives every message of its topic (fan-out);
* messages with the same key go to the same consumer of a group, in publish
  order (key affinity by hash, as Kafka partitions do);
* ``nack(delay)`` re-delivers after the delay with the attempt incremented;
* deliveries never settled when their transport closes are redelivered.

Nothing survives the process: use it for development, tests and the embedded
default, never for production.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor import errors, names, ports
from conveyor.envelope import NATS_PREFIX, WireMessage

_HISTORY = 1000


@dataclass(slots=True)
class _Item:
    message: WireMessage
    attempt: int
    published: float = field(default_factory=time.monotonic)


class _Group:
    """A subscription's state inside the broker."""

    def __init__(self, name: str, topic: str) -> None:
        self.name = name
        self.topic = topic
        self.backlog: deque[_Item] = deque()
        self.consumers: list[MemoryConsumer] = []
        self._round_robin = itertools.count()

    def route(self, item: _Item) -> None:
        if not self.consumers:
            self.backlog.append(item)
            return
        key = item.message.key
        if key is None:
            index = next(self._round_robin) % len(self.consumers)
        else:
            index = zlib.crc32(key.encode()) % len(self.consumers)
        self.consumers[index].enqueue(item)

    def attach(self, consumer: MemoryConsumer) -> None:
        self.consumers.append(consumer)
        self._rebalance()

    def detach(self, consumer: MemoryConsumer) -> None:
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        self.backlog.extendleft(reversed(consumer.take_queued()))
        self._rebalance()

    def _rebalance(self) -> None:
        # Queued (not yet handed out) items are re-routed so key affinity
        # follows the new set of consumers; their relative order is kept.
        queued = list(self.backlog)
        self.backlog.clear()
        for consumer in self.consumers:
            queued.extend(consumer.take_queued())
        for item in queued:
            self.route(item)


class MemoryBroker:
    """An in-process broker shared by the memory transports of one URL."""

    def __init__(self) -> None:
        self._topics: dict[str, list[_Group]] = {}
        self._groups: dict[str, _Group] = {}
        self._history: dict[str, deque[WireMessage]] = {}

    def declare(self, subscription: ports.Subscription) -> _Group:
        group = self._groups.get(subscription.name)
        if group is not None:
            if group.topic != subscription.topic:
                # Reconcile: the subscription moved to another topic.
                self._topics[group.topic].remove(group)
                group.topic = subscription.topic
                self._topics.setdefault(group.topic, []).append(group)
            return group
        group = _Group(subscription.name, subscription.topic)
        self._groups[subscription.name] = group
        self._topics.setdefault(subscription.topic, []).append(group)
        return group

    def publish(self, topic: str, message: WireMessage) -> None:
        self._history.setdefault(topic, deque(maxlen=_HISTORY)).append(message)
        for group in self._topics.get(topic, ()):
            group.route(_Item(message, 1))

    def redeliver(self, group: _Group, item: _Item) -> None:
        group.route(_Item(item.message, item.attempt + 1, item.published))

    def backlog(self, name: str) -> ports.Backlog:
        """Queued and unsettled messages of subscription ``name``, and the age of the oldest.

        Raises:
            TransportError: no such subscription was declared.
        """
        group = self._groups.get(name)
        if group is None:
            raise errors.NotDeclared(f"no memory subscription {name!r}: declare it first")
        queued = [*group.backlog, *(i for c in group.consumers for i in c.queued())]
        out = [d.item for c in group.consumers for d in c.unsettled()]
        now = time.monotonic()
        age = now - min((i.published for i in (*queued, *out)), default=now)
        return ports.Backlog(pending=len(queued), in_flight=len(out), oldest_age_s=age)

    def history(self, topic: str) -> list[WireMessage]:
        """The last messages published to ``topic`` (at most 1000), oldest first."""
        return list(self._history.get(topic, ()))


_brokers: dict[str, MemoryBroker] = {}


def broker_for(url: str) -> MemoryBroker:
    """The process-wide broker named by a ``memory://`` URL."""
    name = url.partition("://")[2].strip("/") or "default"
    return _brokers.setdefault(name, MemoryBroker())


class MemoryDelivery:
    """A delivery from the memory broker."""

    __slots__ = ("_consumer", "_item", "_settled", "attempt", "message", "topic")

    def __init__(self, consumer: MemoryConsumer, item: _Item) -> None:
        self._consumer = consumer
        self._item = item
        self._settled = False
        self.topic = consumer.group.topic
        self.message = item.message
        self.attempt = item.attempt

    async def ack(self) -> None:
        """Settle as done."""
        self._settle()

    async def nack(self, delay: float) -> None:
        """Redeliver after ``delay`` seconds with attempt + 1."""
        self._settle()
        consumer = self._consumer
        loop = asyncio.get_running_loop()
        loop.call_later(max(delay, 0.0), consumer.broker.redeliver, consumer.group, self._item)

    def _settle(self) -> None:
        if self._settled:
            raise errors.TransportError("delivery already acked or nacked")
        self._settled = True
        self._consumer.settled(self)

    @property
    def item(self) -> _Item:
        """The broker's record of this message."""
        return self._item

    def abandon(self) -> None:
        """Give the message back for redelivery (its consumer's transport closed)."""
        if not self._settled:
            self._settled = True
            self._consumer.broker.redeliver(self._consumer.group, self._item)


class MemoryConsumer:
    """A consumer attached to a group of the memory broker."""

    def __init__(
        self,
        broker: MemoryBroker,
        group: _Group,
        subscription: ports.Subscription,
        callback: ports.DeliveryCallback,
    ) -> None:
        self.broker = broker
        self.group = group
        self._prefetch = max(subscription.prefetch, 1)
        self._callback = callback
        self._queue: deque[_Item] = deque()
        self._unsettled: set[MemoryDelivery] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """True while the consumer is receiving."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self.group.attach(self)
        self._task = asyncio.create_task(self._pump(), name=f"memory-consumer:{self.group.name}")

    def enqueue(self, item: _Item) -> None:
        self._queue.append(item)
        self._wakeup.set()

    def queued(self) -> list[_Item]:
        return list(self._queue)

    def unsettled(self) -> list[MemoryDelivery]:
        return list(self._unsettled)

    def take_queued(self) -> list[_Item]:
        items = list(self._queue)
        self._queue.clear()
        return items

    def settled(self, delivery: MemoryDelivery) -> None:
        self._unsettled.discard(delivery)
        self._wakeup.set()

    async def _pump(self) -> None:
        while True:
            while not self._queue or len(self._unsettled) >= self._prefetch:
                self._wakeup.clear()
                await self._wakeup.wait()
            delivery = MemoryDelivery(self, self._queue.popleft())
            self._unsettled.add(delivery)
            await self._callback(delivery)

    async def stop(self) -> None:
        """Stop receiving; queued messages go back to the group."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.group.detach(self)

    def abandon_unsettled(self) -> None:
        for delivery in list(self._unsettled):
            delivery.abandon()
        self._unsettled.clear()


class MemoryTransport:
    """Transport over a :class:`MemoryBroker` of this process.

    Args:
        url: ``memory://`` or ``memory://NAME``.
    """

    features = ports.TransportFeatures(
        ordered_per_key=True,
        history_for_new_groups=False,
        attempts_survive_restart=True,
        durable=False,
    )
    binary_prefix = NATS_PREFIX

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.broker = broker_for(url)
        self._consumers: list[MemoryConsumer] = []
        self._connected = False

    async def connect(self) -> None:
        """Attach to the process's broker."""
        self._connected = True

    async def close(self) -> None:
        """Stop consumers; unsettled deliveries are redelivered to others."""
        self._connected = False
        for consumer in self._consumers:
            await consumer.stop()
        for consumer in self._consumers:
            consumer.abandon_unsettled()
        self._consumers.clear()

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        """Create groups so messages published from now on are kept for them."""
        for topic in topics:
            names.check("topic", topic)
        for subscription in subscriptions:
            self.broker.declare(subscription)

    async def publish(self, topic: str, message: WireMessage) -> None:
        """Hand the message to every group of the topic."""
        if not self._connected:
            raise errors.TransportError(f"memory transport {self.url} is not connected; call connect() first")
        self.broker.publish(topic, message)

    async def publish_many(self, messages: Sequence[tuple[str, WireMessage]]) -> list[Exception | None]:
        """Hand each message to every group of its topic, in order."""
        if not self._connected:
            raise errors.TransportError(f"memory transport {self.url} is not connected; call connect() first")
        results: list[Exception | None] = []
        for topic, message in messages:
            try:
                await self.publish(topic, message)
            except errors.TransportError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    async def subscribe(self, subscription: ports.Subscription, callback: ports.DeliveryCallback) -> MemoryConsumer:
        """Attach a consumer to the subscription's group."""
        if not self._connected:
            raise errors.TransportError(f"memory transport {self.url} is not connected; call connect() first")
        group = self.broker.declare(subscription)
        consumer = MemoryConsumer(self.broker, group, subscription, callback)
        consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def backlog(self, subscription: ports.Subscription) -> ports.Backlog:
        """Messages queued for the subscription, those handed out and unsettled, and the oldest's age.

        Raises:
            TransportError: the subscription was never declared.
        """
        return self.broker.backlog(subscription.name)

    async def check(self) -> None:
        """Always reachable while connected."""
        if not self._connected:
            raise errors.TransportError("memory transport is not connected")
