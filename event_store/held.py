"""Held dead letters: dead letters the broker refused for good, kept in the database instead.

See :class:`conveyor.persistence.DeadLetterStore`. ``conveyor dlq`` lists,
replays and purges them together with the broker's dead letters.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from conveyor import envelope, persistence

from event_store import database, models
from event_store.outbox import as_utc


class SqlDeadLetterStore:
    """Held dead letters on SQL (:class:`conveyor.persistence.DeadLetterStore`).

    Args:
        db: the database.
    """

    def __init__(self, db: database.Database) -> None:
        self.db = db

    async def hold(self, topic: str, message: envelope.WireMessage) -> None:
        """Store a dead letter for ``topic`` in a transaction of its own.

        Raises:
            StoreError: the database failed.
        """
        row = {
            "topic": topic, "message_id": message.message_id, "partition_key": message.key,
            "headers": dict(message.headers), "body": message.body,
        }  # fmt: skip
        async with self.db.transaction() as session:
            await session.execute(sa.insert(models.held_dead_letters).values(**row))

    async def held(self, topic: str, limit: int = 100) -> list[persistence.HeldMessage]:
        """Dead letters held for ``topic``, oldest first.

        Raises:
            StoreError: the database failed.
        """
        table = models.held_dead_letters
        query = sa.select(table).where(table.c.topic == topic).order_by(table.c.id).limit(limit)
        async with self.db.transaction(readonly=True) as session:
            rows = (await session.execute(query)).all()
        return [
            persistence.HeldMessage(
                id=row.id,
                topic=row.topic,
                message=envelope.WireMessage(row.body, dict(row.headers), row.partition_key, row.message_id),
                held_at=as_utc(row.held_at),
            )
            for row in rows
        ]

    async def release(self, ids: Sequence[int]) -> int:
        """Delete held dead letters; return how many.

        Raises:
            StoreError: the database failed.
        """
        if not ids:
            return 0
        table = models.held_dead_letters
        async with self.db.transaction() as session:
            result = await session.execute(sa.delete(table).where(table.c.id.in_(list(ids))))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
