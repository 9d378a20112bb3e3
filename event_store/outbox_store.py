"""The relay's side of the outbox on SQL: claiming due rows in per-key order, marking them.

Claiming (see :class:`conveyor.ports.OutboxStore`):

* Only the *head* of the backlog is considered: the oldest ``window`` unsent
  rows that are due, plus keyed rows waiting after a failed publish (those
  must hold back the later rows of their key). Keyless rows that are merely
  delayed are left out, so scheduled messages never block others.
* For each key, the claim takes a prefix of that key's unsent rows (at most
  ``per_key``), and none if an earlier row of the key is waiting after a
  failure. Keyless rows are taken freely.
* **PostgreSQL**: the claiming transaction locks its rows with ``FOR UPDATE
  SKIP LOCKED`` and stays open while the relay publishes, then marks the rows
  and commits. Another relay skips locked rows; it keeps a key's rows only if
  it also locked that key's first unsent row, so a key is never in flight in
  two relays. A relay that dies releases its locks with its connection and
  its unmarked rows are claimed again.
* **SQLite**: the claim reads without holding the write lock (publishing
  would otherwise block every writer of the file), and marks in a short write
  transaction. Hence: one relay per SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import sqlalchemy as sa
from conveyor import ports
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, listener, models
from event_store.outbox import as_utc, db_time

_CLAIM = """
WITH head AS (
    SELECT id, partition_key, available_at FROM outbox
    WHERE sent_at IS NULL
      AND (available_at <= {now} OR (partition_key IS NOT NULL AND attempts > 0))
    ORDER BY id
    LIMIT :window
), ranked AS (
    SELECT id, partition_key,
           row_number() OVER (PARTITION BY partition_key ORDER BY id) AS rn,
           max(CASE WHEN available_at > {now} THEN 1 ELSE 0 END)
               OVER (PARTITION BY partition_key ORDER BY id) AS blocked
    FROM head
)
SELECT o.id, o.message_id, o.topic, o.partition_key, o.headers, o.body, o.attempts,
       o.created_at, r.rn
FROM outbox o JOIN ranked r ON r.id = o.id
WHERE o.sent_at IS NULL
  AND (r.partition_key IS NULL OR (r.rn <= :per_key AND r.blocked = 0))
ORDER BY o.id
LIMIT :limit
{lock}
"""
_PURGE_CHUNK = 1000


@dataclass
class SqlOutboxBatch:
    """A claim's rows and what the relay recorded about them."""

    messages: Sequence[ports.OutboxMessage]
    sent_ids: list[int] = field(default_factory=list)
    failures: list[tuple[int, str, float]] = field(default_factory=list)

    def sent(self, message: ports.OutboxMessage) -> None:
        """Record that the broker confirmed ``message``."""
        self.sent_ids.append(message.id)

    def failed(self, message: ports.OutboxMessage, error: str, retry_in: float) -> None:
        """Record a failed publish of ``message``; due again in ``retry_in`` seconds."""
        self.failures.append((message.id, error[:2000], max(retry_in, 0.0)))


def _keep_key_prefixes(rows: Sequence[sa.Row[tuple[object, ...]]]) -> list[ports.OutboxMessage]:
    """Drop keyed rows whose key's earlier rows this claim did not get (another relay has them)."""
    last_rank: dict[str, int] = {}
    kept: list[ports.OutboxMessage] = []
    for row in rows:
        key = row.partition_key
        if key is not None:
            if row.rn != last_rank.get(key, 0) + 1:
                last_rank[key] = -1_000_000  # a gap: nothing later of this key
                continue
            last_rank[key] = row.rn
        kept.append(
            ports.OutboxMessage(
                id=row.id,
                message_id=row.message_id,
                topic=row.topic,
                key=key,
                headers=row.headers,
                body=row.body,
                attempts=row.attempts,
                created_at=as_utc(row.created_at),
            )
        )
    return kept


class SqlOutboxStore:
    """The outbox store on SQLite or PostgreSQL (see the module docstring for the claim rules).

    Args:
        db: the database.
        per_key: most rows of one key in one claim.
        window: rows of the backlog's head considered per claim (default 4 x limit, >= 256).
        listen: on PostgreSQL, wake on ``LISTEN conveyor_outbox`` (else poll).
    """

    def __init__(
        self,
        db: database.Database,
        *,
        per_key: int = 16,
        window: int | None = None,
        listen: bool = True,
    ) -> None:
        self.db = db
        self.per_key = per_key
        self.window = window
        self._statement = self._claim_statement()
        self._listener = (
            listener.PgListener(db.url, models.OUTBOX_CHANNEL, db.outbox_signal) if listen and db.is_postgres else None
        )

    def _claim_statement(self) -> sa.TextualSelect:
        now = str(models.utcnow().compile(dialect=self.db.engine.dialect))
        lock = "FOR UPDATE OF o SKIP LOCKED" if self.db.is_postgres else ""
        outbox = models.outbox.c
        return sa.text(_CLAIM.format(now=now, lock=lock)).columns(
            outbox.id, outbox.message_id, outbox.topic, outbox.partition_key, outbox.headers,
            outbox.body, outbox.attempts, outbox.created_at, sa.column("rn", sa.Integer),
        )  # fmt: skip

    async def _select(self, session: AsyncSession, limit: int) -> list[ports.OutboxMessage]:
        window = self.window or max(limit * 4, 256)
        result = await session.execute(self._statement, {"window": window, "per_key": self.per_key, "limit": limit})
        return _keep_key_prefixes(result.all())

    async def _settle(self, session: AsyncSession, batch: SqlOutboxBatch) -> None:
        table = models.outbox
        if batch.sent_ids:
            await session.execute(
                sa.update(table).where(table.c.id.in_(batch.sent_ids)).values(sent_at=models.utcnow())
            )
        for row_id, error, retry_in in batch.failures:
            await session.execute(
                sa.update(table)
                .where(table.c.id == row_id)
                .values(
                    attempts=table.c.attempts + 1,
                    last_error=error,
                    available_at=db_time(self.db.dialect, retry_in),
                )
            )

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[SqlOutboxBatch]:
        """Claim up to ``limit`` due rows; mark what the block recorded when it exits.

        Raises:
            StoreError: the database failed.
        """
        if self.db.is_postgres:
            async with self.db.transaction() as session:
                batch = SqlOutboxBatch(await self._select(session, limit))
                try:
                    yield batch
                except asyncio.CancelledError:
                    raise  # roll back: the rows are claimed again (at-least-once)
                except BaseException:
                    await self._settle(session, batch)
                    raise
                await self._settle(session, batch)
            return
        async with self.db.transaction(readonly=True) as session:
            batch = SqlOutboxBatch(await self._select(session, limit))
        try:
            yield batch
        finally:
            if batch.sent_ids or batch.failures:
                async with self.db.transaction() as session:
                    await self._settle(session, batch)

    async def wait(self, max_wait: float) -> None:
        """Return on a commit notification (LISTEN or in-process) or after ``max_wait`` s."""
        if self._listener is not None:
            await self._listener.ensure()
        signal = self.db.outbox_signal
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(max_wait, 0.0)):
                await signal.wait()
        signal.clear()

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest unsent row is due (0 if one is), None if nothing is unsent.

        Raises:
            StoreError: the database failed.
        """
        table = models.outbox
        query = sa.select(sa.func.min(table.c.available_at), models.utcnow()).where(table.c.sent_at.is_(None))
        async with self.db.transaction(readonly=True) as session:
            earliest, now = (await session.execute(query)).one()
        if earliest is None:
            return None
        return max((as_utc(earliest) - as_utc(now)).total_seconds(), 0.0)

    async def stats(self) -> ports.OutboxStats:
        """Unsent rows and the age of the oldest due one.

        Raises:
            StoreError: the database failed.
        """
        table = models.outbox
        now = models.utcnow()
        unsent = table.c.sent_at.is_(None)
        backlog = sa.select(sa.func.count()).select_from(table).where(unsent).scalar_subquery()
        oldest = (
            sa.select(sa.func.min(table.c.available_at)).where(unsent, table.c.available_at <= now).scalar_subquery()
        )
        async with self.db.transaction(readonly=True) as session:
            count, earliest, db_now = (await session.execute(sa.select(backlog, oldest, now))).one()
        age = 0.0 if earliest is None else max((as_utc(db_now) - as_utc(earliest)).total_seconds(), 0.0)
        return ports.OutboxStats(backlog=int(count), oldest_age=age)

    async def purge(self, older_than: timedelta) -> int:
        """Delete rows sent more than ``older_than`` ago, in chunks; return how many.

        Raises:
            StoreError: the database failed.
        """
        table = models.outbox
        cutoff = db_time(self.db.dialect, -older_than.total_seconds())
        chunk = sa.select(table.c.id).where(table.c.sent_at < cutoff).limit(_PURGE_CHUNK)
        total = 0
        while True:
            async with self.db.transaction() as session:
                result = await session.execute(sa.delete(table).where(table.c.id.in_(chunk)))
            deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
            total += deleted
            if deleted < _PURGE_CHUNK:
                return total

    async def close(self) -> None:
        """Close the LISTEN connection; idempotent."""
        if self._listener is not None:
            await self._listener.close()
