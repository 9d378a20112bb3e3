"""The inbox: which messages each handler has processed, for exactly-once effects.

In the handler's transaction, :meth:`Inbox.claim` inserts ``(handler, message
id)`` first; if the row already exists the message is a duplicate delivery and
the handler's effects are skipped. The insert is ``INSERT ... ON CONFLICT DO
NOTHING`` (PostgreSQL and SQLite), not an insert that fails: a failed
statement would abort a PostgreSQL transaction, and the caller still needs it
to acknowledge the duplicate cleanly.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from conveyor import names
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, direct, models
from event_store.outbox import db_time

_PURGE_CHUNK = 5000


class Inbox:
    """Inbox rows on the SQL database.

    Args:
        db: the database; needed only by :meth:`purge` (claims join the
            caller's session).
    """

    def __init__(self, db: database.Database | None = None) -> None:
        self.db = db

    async def claim(self, session: AsyncSession, handler: str, message_id: str) -> bool:
        """Insert ``(handler, message_id)`` in the caller's open transaction.

        Call it first in the transaction. A concurrent claim of the same pair
        waits for this transaction: if it commits, the other gets False.

        Args:
            session: the caller's session, inside its transaction.
            handler: the handler's name.
            message_id: the message (CloudEvent) id.

        Returns:
            True if this is the first time; False if the message was already
            processed by ``handler`` (skip the effects, acknowledge the message).

        Raises:
            ConfigurationError: invalid handler name.
            StoreError: the database failed.
        """
        names.check("handler name", handler)
        return await direct.claim_inbox(session, handler, message_id)

    async def purge(self, older_than: timedelta) -> int:
        """Delete rows processed more than ``older_than`` ago; return how many.

        Keep ``older_than`` longer than any redelivery can take (broker
        retention, retry budget), or a late duplicate runs again.

        Raises:
            StoreError: the database failed.
            RuntimeError: the inbox was built without a database.
        """
        if self.db is None:
            raise RuntimeError("Inbox.purge needs the Inbox to be built with a Database")
        table = models.inbox
        cutoff = db_time(self.db.dialect, -older_than.total_seconds())
        total = 0
        while True:
            chunk = (
                sa.select(table.c.handler, table.c.message_id).where(table.c.processed_at < cutoff).limit(_PURGE_CHUNK)
            )
            condition = sa.tuple_(table.c.handler, table.c.message_id).in_(chunk)
            async with self.db.transaction() as session:
                result = await session.execute(sa.delete(table).where(condition))
            deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
            total += deleted
            if deleted < _PURGE_CHUNK:
                return total
