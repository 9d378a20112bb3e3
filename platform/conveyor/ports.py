"""Ports: the small protocols between Conveyor's runtime and its adapters.

Each port has an in-memory reference implementation that passes the same
conformance suite (:mod:`conveyor.testing`) as the real backends. The runtime
depends on these protocols only, never on a driver.
"""

from __future__ import annotations

import time as _time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from conveyor.envelope import WireMessage


@dataclass(frozen=True, slots=True)
class TransportFeatures:
    """What a transport guarantees, where brokers honestly differ.

    Conformance tests read these flags instead of testing for a broker by name.

    Attributes:
        ordered_per_key: deliveries with the same key reach a consumer in
            publish order. With several competing consumers only partitioned
            brokers (Kafka) also keep one key on one consumer; elsewhere a
            key's messages may be spread across replicas.
        history_for_new_groups: a subscription created after messages were
            published still receives them (Kafka, JetStream streams); otherwise
            only messages published after it was declared (RabbitMQ, memory).
        attempts_survive_restart: the attempt count of a redelivered message
            survives a worker restart (kept by the broker or in the message).
        durable: messages survive a broker restart.
        refuses_unroutable: a publish to a topic that no subscription receives
            fails with :class:`~conveyor.errors.TransportError` rather than
            being confirmed and dropped (RabbitMQ, which keeps no history).
        acks_settle_a_prefix: an ack takes effect only once every earlier
            delivery of its partition is settled too (Kafka commits offsets): a
            delivery left unsettled keeps every later one, acked or not, for
            redelivery.
    """

    ordered_per_key: bool = True
    history_for_new_groups: bool = False
    attempts_survive_restart: bool = True
    durable: bool = True
    refuses_unroutable: bool = False
    acks_settle_a_prefix: bool = False


@dataclass(frozen=True, slots=True)
class Subscription:
    """One handler's subscription to one topic.

    Attributes:
        name: the handler name; it keys the consumer group, queue or durable
            consumer. Replicas with the same name compete for messages;
            different names each receive every message.
        topic: the Conveyor topic.
        prefetch: most deliveries handed out and not yet acked or nacked.
        ack_wait: seconds the broker waits for an ack (or a keep-alive) before
            redelivering, where it has such a timer; transports with one keep
            the deliveries they hold alive, so it bounds only how long the
            messages of a worker that died wait for another worker.
        max_deliveries: broker-side backstop against redelivery loops, where the
            broker has one (RabbitMQ ``x-delivery-limit``, NATS ``max_deliver``):
            past it RabbitMQ dead-letters the message into the keeper of the
            topic's dead-letter topic, NATS stops delivering it. ``None`` means no broker-side
            limit: a message is delivered again however often it comes back
            unsettled. Keepers of dead letters use it, as every ``conveyor dlq
            list`` is one more delivery. Brokers without such a limit (Kafka,
            memory) ignore the field.
    """

    name: str
    topic: str
    prefetch: int = 64
    ack_wait: float = 60.0
    max_deliveries: int | None = 50


@runtime_checkable
class Delivery(Protocol):
    """One delivery of a message to a subscription.

    Exactly one of :meth:`ack` or :meth:`nack` is called per delivery. A
    delivery neither acked nor nacked before its consumer stops is redelivered
    later (at-least-once).
    """

    topic: str
    message: WireMessage
    attempt: int
    """1 on the first delivery; the broker's count where it keeps one."""

    async def ack(self) -> None:
        """Settle the delivery as done; it will not be delivered again.

        Raises:
            TransportError: the broker did not take the ack; the message may be
                delivered again (the inbox absorbs that).
        """
        ...

    async def nack(self, delay: float) -> None:
        """Have the message delivered again, not before ``delay`` seconds, with attempt + 1.

        Must not block other keys of the subscription while the delay runs.

        Raises:
            TransportError: the broker did not take the nack; the message will
                be redelivered once the broker notices.
        """
        ...


DeliveryCallback = Callable[[Delivery], Awaitable[None]]


class Consumer(Protocol):
    """A running subscription; returned by :meth:`Transport.subscribe`."""

    @property
    def active(self) -> bool:
        """True while the consumer is receiving (for readiness checks)."""
        ...

    async def stop(self) -> None:
        """Stop fetching. Deliveries already handed out may still be acked or nacked."""
        ...


class Transport(Protocol):
    """A message broker, through one small interface.

    Topics are Conveyor topic names; the transport maps them to its own wire
    names (Kafka topic, AMQP routing key, NATS subject).
    """

    features: TransportFeatures
    binary_prefix: str
    """Header prefix of this broker's CloudEvents binary binding."""

    async def connect(self) -> None:
        """Open connections.

        Raises:
            TransientTransportError: the broker is unreachable.
        """
        ...

    async def close(self) -> None:
        """Stop every consumer and close connections; idempotent."""
        ...

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[Subscription]) -> None:
        """Create or reconcile topology (topics, queues, bindings, consumers); idempotent.

        A subscription declared here receives every message published to its
        topic from then on, even before :meth:`subscribe` is called.

        Raises:
            TransportError: the topology cannot be created or reconciled.
        """
        ...

    async def publish(self, topic: str, message: WireMessage) -> None:
        """Send a message and return once the broker has confirmed it.

        Raises:
            TransportError: the broker refused the message or did not confirm it.
        """
        ...

    async def publish_many(self, messages: Sequence[tuple[str, WireMessage]]) -> list[Exception | None]:
        """Send ``(topic, message)`` pairs pipelined; return once the broker has answered for each.

        Messages of one topic with the same key (or with no key) reach the
        broker in the order given. One message's refusal does not stop the
        others: the result holds, at each message's index, ``None`` once the
        broker confirmed it or the :class:`~conveyor.errors.TransportError`
        that refused it.

        Raises:
            TransportError: the transport is not connected (nothing was sent).
        """
        ...

    async def subscribe(self, subscription: Subscription, callback: DeliveryCallback) -> Consumer:
        """Start consuming: ``callback`` is awaited for each delivery, one at a time.

        The callback returning means the delivery was accepted (not that it was
        handled); a callback that waits applies back-pressure. Declares the
        subscription first if needed.

        Raises:
            TransportError: the subscription cannot be started.
        """
        ...

    async def check(self) -> None:
        """Verify the broker is reachable now (for readiness).

        Raises:
            TransportError: it is not, with the reason.
        """
        ...


@dataclass(frozen=True, slots=True)
class Backlog:
    """How much work waits for one subscription, as the broker sees it: the autoscaling signal.

    Attributes:
        pending: messages waiting to be handed to a consumer. Where the broker
            cannot tell waiting from handed out (Kafka: the group's lag, end
            offsets minus committed offsets) it counts both.
        in_flight: messages handed out and not yet settled, where the broker
            counts them (NATS ``num_ack_pending``, memory); None elsewhere.
        oldest_age_s: seconds since the oldest unsettled message was published
            (0 when none is), where the broker knows it (NATS, Kafka, memory);
            None where it does not (RabbitMQ tells no message ages over AMQP)
            or could not be read in time.
    """

    pending: int
    in_flight: int | None = None
    oldest_age_s: float | None = None


@runtime_checkable
class BacklogSource(Protocol):
    """An optional transport capability: report a subscription's backlog.

    A transport without it has no backlog to report; use :func:`backlog_of`.
    """

    async def backlog(self, subscription: Subscription) -> Backlog:
        """The backlog of a declared subscription, read from the broker now.

        Read-only: it never joins a consumer group or takes a delivery.

        Raises:
            TransportError: the broker did not answer, or the subscription is
                not declared there.
        """
        ...


async def backlog_of(transport: object, subscription: Subscription) -> Backlog | None:
    """The backlog of ``subscription`` if ``transport`` can report one, else None.

    Raises:
        TransportError: the transport can and the broker failed.
    """
    if not isinstance(transport, BacklogSource):
        return None
    return await transport.backlog(subscription)


class Clock(Protocol):
    """Time, injectable so tests can skew or freeze it."""

    def now(self) -> datetime:
        """The current aware UTC time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...


class SystemClock:
    """The host's clock."""

    def now(self) -> datetime:
        """The current aware UTC time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds on the host's monotonic clock."""
        return _time.monotonic()


__all__ = [
    "Backlog",
    "BacklogSource",
    "Clock",
    "Consumer",
    "Delivery",
    "DeliveryCallback",
    "Subscription",
    "SystemClock",
    "Transport",
    "TransportFeatures",
    "backlog_of",
]
