"""The stores a handler attempt writes to, in memory: inbox, outbox, event streams, and its unit of work."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from conveyor import envelope, errors, names, persistence, stores, telemetry
from conveyor.memory_persistence.tables import MemoryDatabase, MemoryTx
from conveyor.sagas.store import SagaStore

INBOX = "inbox"
OUTBOX = "outbox"
OUTBOX_IDS = "outbox_ids"
STREAMS = "streams"
EVENTS = "events"
LOG = "event_log"

_MAX_DELAY = timedelta(days=3650).total_seconds()


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One outbox row with everything the relay and operators track about it."""

    message: stores.OutboxMessage
    available_at: datetime
    last_error: str | None = None
    parked_at: datetime | None = None
    sent_at: datetime | None = None

    def moved(self, **changes: Any) -> OutboxRow:
        """A copy with row fields, or message fields (``attempts``), changed."""
        attempts = changes.pop("attempts", None)
        row = replace(self, **changes)
        if attempts is not None:
            row = replace(row, message=replace(row.message, attempts=attempts))
        return row


class MemoryInbox:
    """Inbox rows (:class:`conveyor.stores.InboxStore`)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def claim(self, tx: MemoryTx, handler: str, message_id: str) -> bool:
        """Insert ``(handler, message_id)`` in ``tx``; False if a committed row has it.

        A concurrent claim of the pair waits for the transaction that holds it.

        Raises:
            ConfigurationError: invalid handler name.
            StoreError: an injected fault.
        """
        names.check("handler name", handler)
        await self.db.hook("inbox.claim", tx)
        await self.db.lock(tx, INBOX, (handler, message_id))
        if tx.get(INBOX, (handler, message_id)) is not None:
            return False
        tx.writes.setdefault(INBOX, {})[(handler, message_id)] = self.db.now()
        return True

    async def purge(self, older_than: timedelta) -> int:
        """Delete committed rows processed more than ``older_than`` ago; return how many."""
        await self.db.hook("inbox.purge")
        cutoff = self.db.now() - older_than
        table = self.db.table(INBOX)
        old = [key for key, at in table.items() if at < cutoff]
        for key in old:
            del table[key]
        return len(old)


def _delay_seconds(delay: timedelta | float | None) -> float:
    seconds = 0.0 if delay is None else delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0 or seconds > _MAX_DELAY:
        raise errors.ConfigurationError(f"delay must be between 0 and 3650 days, got {delay!r}")
    return seconds


class MemoryOutbox:
    """Adds outbox rows in the caller's transaction (:class:`conveyor.persistence.OutboxWriter`).

    Args:
        db: the database.
        source: CloudEvents ``source`` of messages built from plain data.
    """

    def __init__(self, db: MemoryDatabase, source: str) -> None:
        self.db = db
        self.source = source

    def build(self, topic: str, data: Any, key: str | None = None) -> envelope.Envelope:
        """The envelope stored for ``data`` (an Envelope is kept as it is, ``key`` aside)."""
        names.check("topic", topic)
        if isinstance(data, envelope.Envelope):
            event = data if key is None else data.evolve(partitionkey=key)
        else:
            event = envelope.create(topic, data, source=self.source, key=key)
        if event.traceparent is None:
            traceparent, tracestate = telemetry.current_trace()
            if traceparent is not None:
                event = event.evolve(traceparent=traceparent, tracestate=tracestate)
        return event

    async def _insert(self, tx: MemoryTx, topic: str, event: envelope.Envelope, available_at: datetime) -> None:
        wire = envelope.to_binary(event, envelope.HTTP_PREFIX)
        row_id = next(self.db.ids)
        message = stores.OutboxMessage(
            id=row_id, message_id=event.scoped_id, topic=topic, key=event.partitionkey,
            headers=dict(wire.headers), body=wire.body, attempts=0, created_at=self.db.now(),
        )  # fmt: skip
        await tx.insert(OUTBOX_IDS, event.scoped_id, row_id)
        tx.writes.setdefault(OUTBOX, {})[row_id] = OutboxRow(message, available_at)

    async def add(
        self,
        tx: MemoryTx,
        topic: str,
        data: Any,
        /,
        *,
        key: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> envelope.Envelope:
        """Store a message for ``topic`` in ``tx``; see :meth:`conveyor.persistence.OutboxWriter.add`.

        Raises:
            ConfigurationError: an invalid delay or time, or both.
            StatementError: the message id is stored already.
            StoreError: an injected fault.
        """
        if delay is not None and at is not None:
            raise errors.ConfigurationError("give either delay or at, not both")
        if at is not None and at.tzinfo is None:
            raise errors.ConfigurationError(f"at must be an aware datetime, got {at!r}")
        seconds = _delay_seconds(delay)
        event = self.build(topic, data, key)
        await self.db.hook("outbox.add", tx)
        due = at if at is not None else self.db.now() + timedelta(seconds=seconds)
        await self._insert(tx, topic, event, due)
        return event

    async def add_once(self, tx: MemoryTx, topic: str, event: envelope.Envelope, /) -> persistence.AddOutcome:
        """Store ``event`` unless its id is stored; see :meth:`conveyor.persistence.OutboxWriter.add_once`."""
        event = self.build(topic, event)
        await self.db.hook("outbox.add", tx)
        await self.db.lock(tx, OUTBOX_IDS, event.scoped_id)
        row_id = tx.get(OUTBOX_IDS, event.scoped_id)
        if row_id is None:
            await self._insert(tx, topic, event, self.db.now())
            return "added"
        stored: OutboxRow | None = tx.get(OUTBOX, row_id)
        if stored is None:
            return "duplicate"
        source = stored.message.headers.get(envelope.HTTP_PREFIX + "source")
        return "duplicate" if stored.message.topic == topic and source == event.source else "conflict"


class MemoryEvents:
    """Event streams and the global log (:class:`conveyor.stores.EventStore`).

    Positions are given at commit, so they increase in commit order.
    """

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def append(
        self, stream_id: str, events: Sequence[stores.NewEvent], *, expected_version: int | None, tx: Any = None
    ) -> int:
        """Append events to a stream; return its new version.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version``.
            StoreError: an injected fault.
        """
        if tx is None:
            async with self.db.transaction() as own:
                return await self.append(stream_id, events, expected_version=expected_version, tx=own)
        await self.db.hook("events.append", tx)
        await self.db.lock(tx, STREAMS, stream_id)
        version: int = tx.get(STREAMS, stream_id, 0)
        if expected_version is not None and expected_version != version:
            raise errors.ConcurrencyConflict(f"stream {stream_id} is at version {version}, not {expected_version}")
        now = self.db.now()
        pending = tx.writes.setdefault(EVENTS, {})
        for event in events:
            version += 1
            metadata: Mapping[str, Any] = dict(event.metadata or {})
            pending[(stream_id, version)] = stores.RecordedEvent(
                0, stream_id, version, event.type, event.data, metadata, now
            )
        tx.writes.setdefault(STREAMS, {})[stream_id] = version
        if _number_events not in tx.before_commit:
            tx.before_commit.append(_number_events)
        return version

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, limit: int | None = None, tx: Any = None
    ) -> list[stores.RecordedEvent]:
        """A stream's events after ``after_version``, oldest first (``tx``'s own appends included)."""
        await self.db.hook("events.read")
        view: MemoryTx = tx if tx is not None else self.db.begin()
        try:
            found = sorted(
                (e for (stream, version), e in view.rows(EVENTS) if stream == stream_id and version > after_version),
                key=lambda e: e.version,
            )
        finally:
            if tx is None:
                view.rollback()
        return found if limit is None else found[:limit]

    async def read_all(self, *, after: int = 0, limit: int = 1000, tx: Any = None) -> list[stores.RecordedEvent]:
        """Committed events with a position above ``after``, in commit order."""
        await self.db.hook("events.read")
        log: list[stores.RecordedEvent] = list(self.db.table(LOG).values())
        return [e for e in log if e.position > after][:limit]


def _number_events(tx: MemoryTx) -> None:
    """At commit: give the transaction's new events their global positions, in append order."""
    log = tx.db.table(LOG)
    numbered = tx.writes.setdefault(LOG, {})
    for key, event in tx.writes.get(EVENTS, {}).items():
        position = len(log) + len(numbered) + 1
        recorded = replace(event, position=position)
        tx.writes[EVENTS][key] = recorded
        numbered[position] = recorded


class BoundEvents:
    """The event store bound to one unit's transaction (``tx.events`` in handlers)."""

    def __init__(self, events: MemoryEvents, tx: MemoryTx) -> None:
        self._events = events
        self._tx = tx

    async def append(self, stream_id: str, events: Sequence[stores.NewEvent], *, expected_version: int | None) -> int:
        """Append in this transaction."""
        return await self._events.append(stream_id, events, expected_version=expected_version, tx=self._tx)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[stores.RecordedEvent]:
        """Read in this transaction."""
        return await self._events.read_stream(stream_id, after_version=after_version, tx=self._tx)


class MemoryUnitOfWork:
    """An open handler transaction (:class:`conveyor.persistence.UnitOfWork`)."""

    def __init__(self, tx: MemoryTx, units: MemoryUnits) -> None:
        self.tx = tx
        self.events = BoundEvents(units.events, tx)
        self.sagas = units.sagas
        self._outbox = units.outbox

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """If the block raises, its writes are undone and the error propagates."""
        async with self.tx.savepoint():
            yield

    async def commit(self, outgoing: Sequence[persistence.Outgoing]) -> None:
        """Write ``outgoing`` to the outbox, in order, and commit.

        Raises:
            StoreError: a row was refused or the commit failed; nothing committed.
            RuntimeError: the unit is closed.
        """
        if not self.tx.open:
            raise RuntimeError("this unit of work is already closed")
        try:
            for message in outgoing:
                await self._outbox.add(self.tx, message.topic, message.envelope, delay=message.delay, at=message.at)
        except BaseException:
            self.tx.rollback()
            raise
        await self.tx.commit()

    async def rollback(self, error: BaseException | None = None) -> BaseException | None:
        """Undo the attempt's writes and its inbox row; idempotent, never raises.

        Returns:
            None: errors of this database are raised as StoreErrors already.
        """
        self.tx.rollback()
        return None


class MemoryUnits:
    """Opens handler units of work (:class:`conveyor.persistence.UnitOfWorkFactory`)."""

    def __init__(
        self, db: MemoryDatabase, inbox: MemoryInbox, outbox: MemoryOutbox, events: MemoryEvents, sagas: SagaStore
    ) -> None:
        self.db = db
        self.inbox = inbox
        self.outbox = outbox
        self.events = events
        self.sagas = sagas

    async def check(self) -> None:
        """Verify the database answers now (the probe before a message is held).

        Raises:
            StoreError: it does not.
        """
        await self.db.check()

    async def begin(self, handler: str, message_id: str) -> MemoryUnitOfWork | None:
        """Open a transaction whose first write is the inbox row; None if the row is committed.

        Raises:
            StoreError: an injected fault; nothing is left open.
        """
        await self.db.hook("begin")
        tx = self.db.begin()
        try:
            claimed = await self.inbox.claim(tx, handler, message_id)
        except BaseException:
            tx.rollback()
            raise
        if not claimed:
            tx.rollback()
            return None
        return MemoryUnitOfWork(tx, self)
