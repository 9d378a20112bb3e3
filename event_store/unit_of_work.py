"""Handler attempts' units of work on SQL, and the assembly of every SQL store behind Conveyor's ports.

A unit of work is one database transaction per handler attempt: its first
write is the inbox row ``(handler, message id)``; the handler's writes, event
appends and outgoing messages (as outbox rows) join it; it commits once, after
the handler returned, or rolls back as a whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from conveyor import errors, names, persistence, stores
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import claims, database, direct, heartbeats, held, outbox_store
from event_store.inbox import Inbox
from event_store.outbox import Outbox
from event_store.sagas import SqlSagaStore
from event_store.store import SqlEventStore

log = logging.getLogger("conveyor.store")


class SqlUnitOfWork:
    """An open handler transaction (:class:`conveyor.persistence.UnitOfWork`).

    Attributes:
        tx: the ``AsyncSession`` of the transaction.
        events: the event store bound to it (``tx.events`` in handlers).
    """

    def __init__(self, session: AsyncSession, units: SqlUnits) -> None:
        self._open = True
        self.tx = session
        self.events = SessionEvents(units.events, session)
        self.sagas = units.sagas
        self._outbox = units.outbox

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A SAVEPOINT: if the block raises, its writes are rolled back and the error propagates.

        Raises:
            StoreError: the database raised inside the block (translated).
        """
        try:
            async with self.tx.begin_nested():
                yield
        except sa_exc.SQLAlchemyError as exc:
            raise database.translate(exc) from exc

    async def commit(self, outgoing: Sequence[persistence.Outgoing]) -> None:
        """Write ``outgoing`` to the outbox and commit.

        Messages due at once (the common case) are one multi-row insert
        straight to the driver (:mod:`event_store.direct`); delayed ones go
        through :meth:`Outbox.add`, in order with the others.

        Raises:
            StoreError: the database refused; everything is rolled back.
            RuntimeError: the unit was already committed or rolled back.
        """
        if not self._open:
            raise RuntimeError("this unit of work is already closed")
        self._open = False
        session = self.tx
        try:
            rows: list[direct.OutboxParams] = []
            for message in outgoing:
                if message.delay is None and message.at is None:
                    event = self._outbox.build(message.topic, message.envelope)
                    rows.append(direct.outbox_params(message.topic, event))
                    continue
                await direct.insert_outbox(session, rows)
                rows = []
                await self._outbox.add(session, message.topic, message.envelope, delay=message.delay, at=message.at)
            await direct.insert_outbox(session, rows)
            await database.commit(session)  # proven; returns the connection to the pool
        except BaseException as error:
            await database.discard(session, drop=database.doubtful(error))
            raise

    async def rollback(self, error: BaseException | None = None) -> errors.StoreError | None:
        """Roll back; idempotent, never raises (a broken connection is dropped).

        Returns:
            ``error`` translated, if the database raised it; otherwise None.
        """
        if self._open:
            self._open = False
            try:
                await database.discard(self.tx, drop=database.doubtful(error))
            except Exception:  # the rollback itself failed: the connection is gone, and so is the transaction
                log.warning("rolling back a handler transaction failed", exc_info=True)
        if isinstance(error, sa_exc.SQLAlchemyError):
            return database.translate(error)
        return None


class SqlUnits:
    """Opens handler units of work on a database (:class:`conveyor.persistence.UnitOfWorkFactory`).

    Args:
        db: the service's database.
        outbox: writes outgoing messages.
        events: the event store.
    """

    def __init__(self, db: database.Database, outbox: Outbox, events: SqlEventStore) -> None:
        self._db = db
        self.outbox = outbox
        self.events = events
        self.sagas = SqlSagaStore()
        self._checked: set[str] = set()

    async def begin(self, handler: str, message_id: str) -> SqlUnitOfWork | None:
        """Open a transaction whose first write is the inbox row; None if the row exists.

        Raises:
            ConfigurationError: invalid handler name.
            StoreError: the database failed; nothing is left open.
        """
        if handler not in self._checked:
            names.check("handler name", handler)
            self._checked.add(handler)
        session = self._db.sessions()
        try:
            claimed = await direct.claim_inbox(session, handler, message_id)
        except BaseException as error:
            await database.discard(session, drop=database.doubtful(error))
            raise
        if not claimed:
            await database.discard(session)
            return None
        return SqlUnitOfWork(session, self)

    async def check(self) -> None:
        """Verify the database takes a write now (see :meth:`Database.check`)."""
        await self._db.check(write=True)


class SessionEvents:
    """The event store bound to one transaction's session (``tx.events``)."""

    def __init__(self, store: SqlEventStore, session: AsyncSession) -> None:
        self._store = store
        self._session = session

    async def append(self, stream_id: str, events: Sequence[stores.NewEvent], *, expected_version: int | None) -> int:
        """Append in this transaction; see :meth:`SqlEventStore.append`."""
        return await self._store.append(stream_id, events, expected_version=expected_version, tx=self._session)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[stores.RecordedEvent]:
        """Read in this transaction; see :meth:`SqlEventStore.read_stream`."""
        return await self._store.read_stream(stream_id, after_version=after_version, tx=self._session)


def sql_persistence(db: database.Database, source: str, **relay: Any) -> persistence.Persistence:
    """Every SQL store of ``db`` behind Conveyor's persistence ports.

    Args:
        db: the service's database (migrated).
        source: CloudEvents ``source`` of messages built from plain data.
        **relay: options of :class:`~event_store.outbox_store.SqlOutboxStore`.
    """
    outbox = Outbox(source)
    events = SqlEventStore(db)
    units = SqlUnits(db, outbox, events)
    return persistence.Persistence(
        database=db,
        units=units,
        outbox=outbox,
        inbox=Inbox(db),
        events=events,
        schedules=claims.SqlScheduleStore(db),
        dead_letters=held.SqlDeadLetterStore(db),
        sagas=units.sagas,
        relay_store=lambda: outbox_store.SqlOutboxStore(db, **relay),
        heartbeats=heartbeats.SqlHeartbeatStore(db),
    )
