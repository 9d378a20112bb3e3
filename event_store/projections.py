"""Projections: read models built from the event log, exactly once per event.

A projection's writes and its position in the log commit in one transaction,
so after a crash it resumes exactly after the last event whose effects
committed. The position row is locked for the batch (``SELECT ... FOR
UPDATE`` on PostgreSQL, the single writer on SQLite), so two runners of the
same projection never apply the same event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import sqlalchemy as sa
from conveyor import names, stores
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, models, store

log = logging.getLogger("conveyor.event_store.projections")


class Projection(Protocol):
    """Something that applies events to a read model.

    Attributes:
        name: stable, unique name; keys the stored position.
    """

    name: str

    async def apply(self, session: AsyncSession, event: stores.RecordedEvent) -> None:
        """Apply one event in the runner's transaction ``session``; raise to abort the batch."""
        ...


async def load_position(session: AsyncSession, name: str, *, lock: bool = False) -> int:
    """The stored position of ``name`` (0 if none), optionally locking its row until commit."""
    table = models.positions
    if lock:
        insert = database.insert_for(session)
        await session.execute(
            insert(table).values(name=name, position=0).on_conflict_do_nothing(index_elements=["name"])
        )
    query = sa.select(table.c.position).where(table.c.name == name)
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return int((await session.execute(query)).scalar() or 0)


async def save_position(session: AsyncSession, name: str, position: int) -> None:
    """Store ``position`` for ``name`` in the caller's transaction (the row must exist)."""
    table = models.positions
    await session.execute(
        sa.update(table).where(table.c.name == name).values(position=position, updated_at=models.utcnow())
    )


class ProjectionRunner:
    """Feeds a projection the events after its stored position, in batches.

    Args:
        db: the database.
        projection: the projection.
        batch_size: events per transaction.
    """

    def __init__(self, db: database.Database, projection: Projection, *, batch_size: int = 100) -> None:
        names.check("projection name", projection.name)
        self.db = db
        self.projection = projection
        self.batch_size = batch_size
        self._store = store.SqlEventStore(db)

    async def position(self) -> int:
        """The projection's stored position.

        Raises:
            StoreError: the database failed.
        """
        async with self.db.transaction(readonly=True) as session:
            return await load_position(session, self.projection.name)

    async def run_once(self) -> int:
        """Apply the next batch of events in one transaction; return how many were applied.

        Raises:
            StoreError: the database failed; nothing of the batch committed.
            Exception: whatever the projection raised; nothing of the batch committed.
        """
        name = self.projection.name
        async with self.db.transaction() as session:
            after = await load_position(session, name, lock=True)
            events = await self._store.read_all(after=after, limit=self.batch_size, tx=session)
            for event in events:
                await self.projection.apply(session, event)
            if events:
                await save_position(session, name, events[-1].position)
        return len(events)

    async def run(self, stop: asyncio.Event, *, poll_interval: float = 0.5, max_backoff: float = 30.0) -> None:
        """Run until ``stop`` is set: apply batches, poll when caught up, back off on failures."""
        backoff = poll_interval
        while not stop.is_set():
            try:
                applied = await self.run_once()
            except Exception as exc:
                log.warning(
                    "projection %s failed (%r); retrying in %.1fs",
                    self.projection.name,
                    exc,
                    backoff,
                )
                applied, backoff = 0, min(backoff * 2, max_backoff)
            else:
                backoff = poll_interval
            if applied < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await stop.wait()
