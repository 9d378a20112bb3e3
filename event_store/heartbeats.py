"""Worker heartbeats on SQL: see :class:`conveyor.heartbeats.HeartbeatStore`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from conveyor import heartbeats

from event_store import claims, database, models
from event_store.outbox import as_utc


class SqlHeartbeatStore:
    """Heartbeats in the ``worker_heartbeats`` table (:class:`conveyor.heartbeats.HeartbeatStore`).

    Args:
        db: the database.
    """

    def __init__(self, db: database.Database) -> None:
        self.db = db

    async def beat(self, heartbeat: heartbeats.Heartbeat) -> None:
        """Insert or replace the row of ``heartbeat.id``, ``beat_at`` set by the database clock.

        Raises:
            StoreError: the database failed.
        """
        table = models.worker_heartbeats
        values: dict[str, Any] = {
            "service": heartbeat.service, "host": heartbeat.host, "pid": heartbeat.pid,
            "roles": list(heartbeat.roles), "handlers": list(heartbeat.handlers),
            "in_flight": heartbeat.in_flight, "started_at": heartbeat.started_at, "beat_at": models.utcnow(),
        }  # fmt: skip
        async with self.db.transaction() as session:
            # Only the process itself writes its row: an update, else an insert, cannot race.
            updated = await session.execute(sa.update(table).where(table.c.id == heartbeat.id).values(**values))
            if not updated.rowcount:  # type: ignore[attr-defined]
                await session.execute(sa.insert(table).values(id=heartbeat.id, **values))

    async def seen(self) -> list[heartbeats.Seen]:
        """Every row, most recent beat first, with its age on the database clock.

        Raises:
            StoreError: the database failed.
        """
        table = models.worker_heartbeats
        async with self.db.transaction(readonly=True) as session:
            now = await claims.database_now(session)
            rows = (await session.execute(sa.select(table).order_by(table.c.beat_at.desc(), table.c.id))).all()
        found = []
        for row in rows:
            beat_at = as_utc(row.beat_at)
            heartbeat = heartbeats.Heartbeat(
                id=row.id, service=row.service, host=row.host, pid=row.pid, roles=tuple(row.roles),
                handlers=tuple(row.handlers), in_flight=row.in_flight, started_at=as_utc(row.started_at),
            )  # fmt: skip
            found.append(heartbeats.Seen(heartbeat, beat_at, max(now - beat_at, timedelta(0))))
        return found

    async def leave(self, id: str) -> None:  # noqa: A002 - the heartbeat's id
        """Delete the row of ``id``, if any.

        Raises:
            StoreError: the database failed.
        """
        table = models.worker_heartbeats
        async with self.db.transaction() as session:
            await session.execute(sa.delete(table).where(table.c.id == id))

    async def purge(self, older_than: timedelta) -> int:
        """Delete rows whose last beat is older than ``older_than`` (database clock); return how many.

        Raises:
            StoreError: the database failed.
        """
        table = models.worker_heartbeats
        async with self.db.transaction() as session:
            cutoff = await claims.database_now(session) - older_than
            result = await session.execute(sa.delete(table).where(table.c.beat_at < cutoff))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
