"""Storage ports: the outbox, the inbox and the event store, as the runtime needs them.

The ``event_store`` package implements them on SQL (SQLite, PostgreSQL); in-memory
reference implementations pass the same conformance suite (:mod:`conveyor.testing`).

``tx`` arguments are the caller's open transaction: with the SQL stores, a SQLAlchemy
``AsyncSession`` inside ``session.begin()``. A port that joins the caller's transaction
takes it as an argument; there is no ambient session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol


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

    ``backlog == due + scheduled + parked``.

    Attributes:
        backlog: unsent rows (due, scheduled or parked).
        oldest_age: seconds since the oldest unsent, due, unparked row became due (0 when none).
        parked: rows parked after their last attempt, waiting for an operator.
        due: unparked rows the relay may publish now.
        scheduled: unparked rows not due yet: delayed messages (saga timers
            among them) and rows waiting out a failed publish's backoff.
    """

    backlog: int
    oldest_age: float
    parked: int = 0
    due: int = 0
    scheduled: int = 0


@dataclass(frozen=True, slots=True)
class TopicBacklog:
    """Unsent outbox rows of one topic.

    Attributes:
        topic: the topic.
        unsent: its unsent rows (due, scheduled or parked).
        parked: those of them parked, waiting for an operator.
        due: those of them unparked and due: the relay may publish them now.
        scheduled: those of them unparked and not due yet (delayed, saga
            timers, backing off after a failed publish).
    """

    topic: str
    unsent: int
    parked: int
    due: int = 0
    scheduled: int = 0


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


ERROR_TEXT_LIMIT = 2000
"""Characters of a publish error an outbox row keeps."""


@dataclass
class RecordedBatch:
    """An :class:`OutboxBatch` that records what the relay did, for its store to apply on exit.

    Every :class:`OutboxStore` implementation keeps its claim's fate the same
    way; only how it applies it (SQL statements, a memory table) differs.
    """

    messages: Sequence[OutboxMessage]
    sent_ids: list[int] = field(default_factory=list)
    failures: list[tuple[int, str, float]] = field(default_factory=list)
    parkings: list[tuple[int, str]] = field(default_factory=list)
    interruptions: list[tuple[int, str]] = field(default_factory=list)

    def sent(self, message: OutboxMessage) -> None:
        """Record that the broker confirmed ``message``."""
        self.sent_ids.append(message.id)

    def failed(self, message: OutboxMessage, error: str, retry_in: float) -> None:
        """Record a refused publish of ``message``; due again in ``retry_in`` seconds."""
        self.failures.append((message.id, error[:ERROR_TEXT_LIMIT], max(retry_in, 0.0)))

    def parked(self, message: OutboxMessage, error: str) -> None:
        """Record the last refused attempt of ``message``; it is parked."""
        self.parkings.append((message.id, error[:ERROR_TEXT_LIMIT]))

    def interrupted(self, message: OutboxMessage, error: str) -> None:
        """Record that the broker was unreachable for ``message`` (no attempt spent)."""
        self.interruptions.append((message.id, error[:ERROR_TEXT_LIMIT]))

    @property
    def recorded(self) -> bool:
        """True if anything is to be stored."""
        return bool(self.sent_ids or self.failures or self.parkings or self.interruptions)


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

    async def topics(self, limit: int = 1000) -> list[TopicBacklog]:
        """Every topic with unsent rows, by name (at most ``limit``), with its unsent and parked counts.

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


__all__ = [
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
    "TopicBacklog",
]
