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
        ordered_per_key: deliveries with the same key reach a subscription in
            publish order.
        history_for_new_groups: a subscription created after messages were
            published still receives them (Kafka, JetStream streams); otherwise
            only messages published after it was declared (RabbitMQ, memory).
        attempts_survive_restart: the attempt count of a redelivered message
            survives a worker restart (kept by the broker or in the message).
        durable: messages survive a broker restart.
    """

    ordered_per_key: bool = True
    history_for_new_groups: bool = False
    attempts_survive_restart: bool = True
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Subscription:
    """One handler's subscription to one topic.

    Attributes:
        name: the handler name; it keys the consumer group, queue or durable
            consumer. Replicas with the same name compete for messages;
            different names each receive every message.
        topic: the Conveyor topic.
        prefetch: most deliveries handed out and not yet acked or nacked.
        ack_wait: seconds the broker waits for an ack before redelivering, where
            it has such a timer; must exceed the handler timeout.
        max_deliveries: broker-side backstop against redelivery loops, where the
            broker has one (RabbitMQ ``x-delivery-limit``, NATS ``max_deliver``).
    """

    name: str
    topic: str
    prefetch: int = 64
    ack_wait: float = 60.0
    max_deliveries: int = 50


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
    "Clock",
    "Consumer",
    "Delivery",
    "DeliveryCallback",
    "Subscription",
    "SystemClock",
    "Transport",
    "TransportFeatures",
]
