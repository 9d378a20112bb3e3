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
    """

    ordered_per_key: bool = True
    history_for_new_groups: bool = False
    attempts_survive_restart: bool = True
    durable: bool = True
    refuses_unroutable: bool = False


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
            past it the broker drops the message. ``None`` means no broker-side
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


# --- Persistence ports (implemented by the ``event_store`` package) ---------
# ``tx`` arguments are the caller's open transaction: with the SQL stores, a
# SQLAlchemy ``AsyncSession`` inside ``session.begin()``. A port that joins the
# caller's transaction takes it as an argument; there is no ambient session.

from collections.abc import Mapping  # noqa: E402 - appended section
from contextlib import AbstractAsyncContextManager  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any, Literal  # noqa: E402


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One outbox row handed to the relay.

    Attributes:
        id: the row's position in the outbox (insertion order).
        message_id: the CloudEvent id; publish it as the broker-level message id.
        topic: the Conveyor topic to publish to.
        key: the ordering key, if any.
        headers: the event as binary-mode HTTP headers (``ce-*``, ``content-type``).
        body: the event's data.
        attempts: failed publish attempts so far (a broker outage spends none).
        created_at: when the row was committed (database clock, aware UTC).
    """

    id: int
    message_id: str
    topic: str
    key: str | None
    headers: dict[str, str]
    body: bytes
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Backlog figures for metrics.

    Attributes:
        backlog: unsent rows (due, delayed or parked).
        oldest_age: seconds since the oldest unsent, due, unparked row became due (0 when none).
        parked: rows parked after their last attempt, waiting for an operator.
    """

    backlog: int
    oldest_age: float
    parked: int = 0


OutboxStatus = Literal["pending", "parked", "sent"]
"""Where an outbox row is: ``pending`` (the relay publishes it when due), ``parked``, or ``sent``."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outbox row as an operator sees it (``conveyor outbox list|show``).

    Attributes:
        message: the row itself (attempts included).
        status: ``pending``, ``parked`` (failed ``max_attempts`` times; it
            waits for ``retry`` or ``purge_parked``) or ``sent``.
        available_at: when the row is due (a delay, or a failed attempt's backoff).
        last_error: the last publish error, if any.
        parked_at: when the row was parked.
        sent_at: when the broker confirmed it.
    """

    message: OutboxMessage
    status: OutboxStatus
    available_at: datetime
    last_error: str | None = None
    parked_at: datetime | None = None
    sent_at: datetime | None = None


class OutboxBatch(Protocol):
    """Rows claimed by one relay; settled when the claim's context exits.

    Attributes:
        messages: the claimed rows in outbox order. For each key they are the
            oldest unsent rows of that key, in order; publish them in that
            order and stop at the first failure of a key.
    """

    messages: Sequence[OutboxMessage]

    def sent(self, message: OutboxMessage) -> None:
        """Record that the broker confirmed ``message``; it is marked sent on exit."""
        ...

    def failed(self, message: OutboxMessage, error: str, retry_in: float) -> None:
        """Record a publish the broker refused (attempts + 1, the error); due again in ``retry_in`` s."""
        ...

    def parked(self, message: OutboxMessage, error: str) -> None:
        """Record the last attempt the broker refused (attempts + 1, the error) and park the row.

        A parked row is never claimed again until :meth:`OutboxStore.retry`;
        while it is parked the later rows of its key wait too.
        """
        ...

    def interrupted(self, message: OutboxMessage, error: str) -> None:
        """Record a publish that failed because the broker was unreachable or busy.

        Only the error is kept: the row spends no attempt, is never parked for
        it, and is due again at once (the relay backs off as a whole).
        """
        ...


class OutboxStore(Protocol):
    """The relay's side of the transactional outbox.

    Ordering: rows of one key are claimed only as the oldest unsent rows of
    that key, so at most one relay has a key in flight; rows without a key are
    claimed freely. A key whose oldest unsent row is backing off after a
    refused publish, or is parked, *waits*: none of its rows is claimed, and
    it never delays other keys or keyless rows. Delayed rows (not yet due,
    never attempted) hold back nothing. Concurrency: several relays may claim
    at once where the store says so (PostgreSQL: ``FOR UPDATE SKIP LOCKED``);
    each row is in at most one open claim; a store that allows one relay per
    database (a SQLite file) claims nothing while another relay holds it. A
    store with ``concurrent_claims = True`` lets one relay hold several of its
    claims open at once (claim the next batch, mark the previous one, while a
    batch publishes): it then never returns a row, or a row of a key, that is
    in another of its open claims.
    Idempotency: a row claimed but never marked sent (the relay crashed after
    publishing) is claimed again, so a message may be published more than
    once with the same message id; consumers dedupe.
    """

    def claim(self, limit: int) -> AbstractAsyncContextManager[OutboxBatch]:
        """Claim up to ``limit`` due rows; on exit, store what the batch recorded.

        If the block raises (other than by cancellation), what it recorded is
        still stored, so rows the broker confirmed are never published again
        for that; rows not recorded stay unsent and are claimed again later.

        Raises:
            StoreError: the database failed (nothing was claimed or marked).
        """
        ...

    async def wait(self, max_wait: float) -> None:
        """Return when new rows may be due (a commit was notified), or after ``max_wait`` s."""
        ...

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable row becomes due (0 if one is), None if none will.

        Only rows :meth:`claim` could return count: parked rows and the rows
        of a waiting key do not (the waiting key's backing-off row does, at its
        due time). None also while this store stands by for another relay.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def stats(self) -> OutboxStats:
        """Backlog size, parked rows and the age of the oldest unsent due row.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def entries(
        self, *, status: Literal["pending", "parked"] | None = None, topic: str | None = None, limit: int = 100
    ) -> list[OutboxEntry]:
        """Unsent rows in outbox order (oldest first), at most ``limit``.

        Args:
            status: only ``pending`` or only ``parked`` rows; None for both.
            topic: only rows for this topic.
            limit: most rows returned.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def get(self, message_id: str) -> OutboxEntry:
        """The row of ``message_id``, whatever its status (until purged after sending).

        Raises:
            NotFound: no row has this message id.
            StoreError: the database failed.
        """
        ...

    async def retry(self, message_ids: Sequence[str] | None) -> int:
        """Make rows due now with no attempts spent, un-parking them; return how many.

        Args:
            message_ids: unsent rows (parked, or backing off) to retry; None
                for every parked row. Idempotent: retrying twice is retrying once.

        Raises:
            NotFound: a given id is not an unsent row; nothing was changed.
            StoreError: the database failed.
        """
        ...

    async def purge_parked(self, message_ids: Sequence[str] | None) -> int:
        """Delete parked rows (they are never published); return how many.

        The later rows of a purged row's key are then published: the operator
        chose to give up that message. Idempotent for None.

        Args:
            message_ids: parked rows to delete; None for every parked row.

        Raises:
            NotFound: a given id is not a parked row; nothing was deleted.
            StoreError: the database failed.
        """
        ...

    async def purge(self, older_than: timedelta) -> int:
        """Delete rows sent more than ``older_than`` ago; return how many.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def close(self) -> None:
        """Release connections (listeners); idempotent."""
        ...


class InboxStore(Protocol):
    """Which messages each handler has processed: the inbox half of exactly-once effects."""

    async def claim(self, tx: Any, handler: str, message_id: str) -> bool:
        """Insert ``(handler, message_id)`` in the caller's transaction ``tx``.

        Call it first in the transaction. Returns False if the row exists: the
        message was already processed, and the caller should skip its effects
        (the transaction stays usable). Concurrent claims of the same pair
        wait for each other: exactly one transaction that commits gets True.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def purge(self, older_than: timedelta) -> int:
        """Delete rows processed more than ``older_than`` ago; return how many.

        Keep the retention longer than any redelivery can take, or a late
        duplicate is processed again.

        Raises:
            StoreError: the database failed.
        """
        ...


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append to a stream.

    Attributes:
        type: the event type.
        data: the encoded event (JSON bytes by convention).
        metadata: JSON-compatible metadata (correlation ids, trace context, ...).
    """

    type: str
    data: bytes
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored.

    Attributes:
        position: global position in the event log; increases in commit order.
        stream_id: the stream it belongs to.
        version: its version within the stream (1, 2, ...).
        type: the event type.
        data: the encoded event.
        metadata: its metadata.
        recorded_at: when it was recorded (database clock, aware UTC).
    """

    position: int
    stream_id: str
    version: int
    type: str
    data: bytes
    metadata: Mapping[str, Any]
    recorded_at: datetime


class EventStore(Protocol):
    """Streams of events with optimistic concurrency and a global, commit-ordered log."""

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
        tx: Any = None,
    ) -> int:
        """Append events to a stream; return the stream's new version.

        Args:
            stream_id: the stream.
            events: the events, in order; they get versions
                ``expected_version + 1 ...``.
            expected_version: the version the caller last saw (0: the stream
                must be new); None appends after whatever is there.
            tx: the caller's transaction, or None for a transaction of its own.

        Ordering: positions of committed events increase in commit order, so a
        reader of :meth:`read_all` that resumes after the last position it saw
        never skips an event. Concurrency: of two appends with the same
        expected version, one fails.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version``.
            StoreError: the database failed.
        """
        ...

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, limit: int | None = None, tx: Any = None
    ) -> list[RecordedEvent]:
        """Events of one stream with a version above ``after_version``, oldest first.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def read_all(self, *, after: int = 0, limit: int = 1000, tx: Any = None) -> list[RecordedEvent]:
        """Committed events of every stream with a position above ``after``, in commit order.

        Raises:
            StoreError: the database failed.
        """
        ...


__all__ += [
    "EventStore",
    "InboxStore",
    "NewEvent",
    "OutboxBatch",
    "OutboxEntry",
    "OutboxMessage",
    "OutboxStats",
    "OutboxStatus",
    "OutboxStore",
    "RecordedEvent",
]
