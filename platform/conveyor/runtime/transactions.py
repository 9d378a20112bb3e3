"""Handler transactions over the service's database: inbox first, then the handler's writes, then the outbox."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from conveyor.context import Context
from conveyor.transaction import AlreadyHandled, Transaction
from event_store.database import Database
from event_store.inbox import Inbox
from event_store.outbox import Outbox


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
            tx = Transaction(session, ctx.child)
            yield tx
            for pending in tx.pending:
                await self._outbox.add(session, pending.topic, pending.envelope, delay=pending.delay, at=pending.at)
