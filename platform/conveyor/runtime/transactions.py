"""Handler transactions over the service's database: inbox first, then the handler's writes, then the outbox."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from conveyor import ports
from conveyor.context import Context
from conveyor.transaction import AlreadyHandled, Transaction
from event_store.database import Database
from event_store.inbox import Inbox
from event_store.outbox import Outbox
from event_store.store import SqlEventStore


class DatabaseTransactions:
    """Opens ``ctx.transaction()`` on a :class:`~event_store.database.Database`.

    Args:
        database: the service's database (migrated).
        source: CloudEvents ``source`` of messages published in transactions.
    """

    def __init__(self, database: Database, source: str) -> None:
        self._database = database
        self._inbox = Inbox()
        self._outbox = Outbox(source)
        self._events = SqlEventStore(database)

    @contextlib.asynccontextmanager
    async def begin(self, ctx: Context) -> AsyncIterator[Transaction]:
        """A transaction whose first write is the inbox row of ``ctx``'s message.

        Raises:
            AlreadyHandled: the inbox already has the message for this handler.
            StoreError: the database failed.
        """
        async with self._database.transaction() as session:
            if not await self._inbox.claim(session, ctx.handler, ctx.message.id):
                raise AlreadyHandled(f"{ctx.handler} already handled message {ctx.message.id}")
            tx = Transaction(session, ctx.child, _SessionEvents(self._events, session))
            yield tx
            for pending in tx.pending:
                await self._outbox.add(session, pending.topic, pending.envelope, delay=pending.delay, at=pending.at)


class _SessionEvents:
    """The event store bound to one handler transaction's session."""

    def __init__(self, store: SqlEventStore, session: AsyncSession) -> None:
        self._store = store
        self._session = session

    async def append(self, stream_id: str, events: Sequence[ports.NewEvent], *, expected_version: int | None) -> int:
        return await self._store.append(stream_id, events, expected_version=expected_version, tx=self._session)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[ports.RecordedEvent]:
        return await self._store.read_stream(stream_id, after_version=after_version, tx=self._session)
