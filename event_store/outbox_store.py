"""The relay's side of the outbox on SQL: claiming due rows in per-key order, marking them.

Claiming (see :class:`conveyor.stores.OutboxStore`):

* A key *waits* while its oldest unsent row that failed is backing off
  (``attempts > 0``, ``available_at`` in the future) or is parked: the claim
  skips every row of the key from that row on, so a failing key never fills
  the claim's window and other keys and keyless rows keep their full rate. The
  rows that can make a key wait are few (one per failing key) and sit in the
  partial index ``ix_outbox_retrying``; skipping a row is one probe into it.
* Of the rows that remain and are due (``available_at <= now``), the oldest
  ``window`` are considered; a never-attempted row that is delayed holds back
  nothing. For each key the claim takes a prefix of that key's rows (at most
  ``per_key``); keyless rows are taken freely.
* **Parking.** The relay parks a row when its last allowed publish is
  refused (``parked_at``, ``last_error`` kept). A parked row is never claimed
  again until an operator retries it (:meth:`SqlOutboxStore.retry`) or purges
  it (:meth:`SqlOutboxStore.purge_parked`). A parked keyed row **holds its
  key**: the later rows of that key wait, so per-key order is never silently
  broken. A parked keyless row blocks nothing. A broker outage is not a row's
  fault: an interrupted publish records the error only.
* **PostgreSQL**: the claiming transaction locks its rows with ``FOR UPDATE
  SKIP LOCKED`` and stays open while the relay publishes, then marks the rows
  and commits, also when the relay's block raised (so rows the broker
  confirmed are not published again); only cancellation rolls back. Another
  relay skips locked rows; it keeps a key's rows only if it also locked that
  key's first claimable row, so a key is never in flight in two relays. A relay
  that dies releases its locks with its connection and its unmarked rows are
  claimed again.
* **SQLite**: the claim reads without holding the write lock (publishing
  would otherwise block every writer of the file), and marks in a short write
  transaction. Hence one relay per SQLite file, enforced by an exclusive lock
  on ``<database>-relay.lock`` (:mod:`event_store.relay_lock`): a store whose
  relay does not hold it claims nothing, says once that it stands by, and
  tries again on every claim. In-memory SQLite needs no lock.
* **Claims open at once.** A relay claims its next batch while it publishes
  the current one (:attr:`SqlOutboxStore.concurrent_claims`). A key is never
  in two open claims: on PostgreSQL the open claim's locks and the key-prefix
  rule keep it out; on both dialects the store also skips the ids and keys of
  its own open claims (taken as they were when the claim began, and released
  only once a claim's marks committed, so a claim never sees a row of a key in
  flight, nor a marked row as unsent). In-memory SQLite is one connection:
  one claim at a time there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any, Literal

import sqlalchemy as sa
from conveyor import errors, stores
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, direct, listener, models, outbox_admin, outbox_sql, relay_lock
from event_store.outbox import as_utc, db_time

log = logging.getLogger("conveyor.event_store.outbox")

_PURGE_CHUNK = 1000


SqlOutboxBatch = stores.RecordedBatch
"""A claim of :class:`SqlOutboxStore` (:class:`conveyor.stores.RecordedBatch`)."""


class SqlOutboxStore:
    """The outbox store on SQLite or PostgreSQL (see the module docstring for the claim rules).

    Args:
        db: the database.
        per_key: most rows of one key in one claim.
        window: claimable due rows considered per claim (default 4 x limit, >= 256).
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
        self._statement = outbox_sql.claim_statement(db.engine.dialect)
        self._driver_sql = outbox_sql.claim_driver_sql(db.engine.dialect) if db.is_postgres else ""
        self._next_due = outbox_sql.next_due_statement(db.engine.dialect)
        self._listener = (
            listener.PgListener(db.url, models.OUTBOX_CHANNEL, db.outbox_signal) if listen and db.is_postgres else None
        )
        self._listening: asyncio.Future[bool] | None = None
        file_sqlite = db.is_sqlite and not database.is_memory_sqlite(db.url)
        self._lock = relay_lock.RelayLock(relay_lock.lock_path(str(db.url.database))) if file_sqlite else None
        self._standing_by = False
        self._in_flight_ids: set[int] = set()
        self._in_flight_keys: collections.Counter[str] = collections.Counter()
        self.concurrent_claims = not database.is_memory_sqlite(db.url)
        """True if a relay may hold several claims at once (every database but in-memory SQLite)."""

    def _may_claim(self) -> bool:
        """False while another relay holds this SQLite file (logged once per stand-by)."""
        lock = self._lock
        if lock is None or lock.held:
            return True
        if lock.acquire():
            if self._standing_by:
                log.info("outbox relay taking over %s: the other relay stopped", self.db.display_url())
            self._standing_by = False
            return True
        if not self._standing_by:
            log.info(
                "outbox relay standing by: another relay publishes %s (it holds %s)",
                self.db.display_url(),
                lock.path,
            )
            self._standing_by = True
        return False

    async def _select(self, session: AsyncSession, limit: int) -> list[stores.OutboxMessage]:
        """The claimable rows, without the ids and keys of this store's open claims."""
        busy_ids, busy_keys = sorted(self._in_flight_ids), sorted(self._in_flight_keys)  # before the statement
        window = self.window or max(limit * 4, 256)
        rows: Sequence[Any] | None = None
        if self._driver_sql:
            driver_params = (window, self.per_key, limit, busy_ids, busy_keys)
            rows = await direct.claim_rows(session, self._driver_sql, driver_params)
        if rows is None:
            params = {"window": window, "per_key": self.per_key, "limit": limit}
            rows = (
                await session.execute(self._statement, {**params, "busy_ids": busy_ids, "busy_keys": busy_keys})
            ).all()
        messages = outbox_sql.keep_key_prefixes(rows)  # the statement left the busy ids and keys out
        self._in_flight_ids.update(m.id for m in messages)
        self._in_flight_keys.update(m.key for m in messages if m.key is not None)
        return messages

    def _landed(self, messages: Sequence[stores.OutboxMessage]) -> None:
        """A claim's marks committed (or it ended): its ids and keys are no longer in flight."""
        self._in_flight_ids.difference_update(m.id for m in messages)
        self._in_flight_keys.subtract(m.key for m in messages if m.key is not None)
        self._in_flight_keys += collections.Counter()  # drops keys counted down to zero

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
        for row_id, error in batch.parkings:
            await session.execute(
                sa.update(table)
                .where(table.c.id == row_id)
                .values(attempts=table.c.attempts + 1, last_error=error, parked_at=models.utcnow())
            )
        for row_id, error in batch.interruptions:
            await session.execute(sa.update(table).where(table.c.id == row_id).values(last_error=error))

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[SqlOutboxBatch]:
        """Claim up to ``limit`` due rows; store what the block recorded when it exits.

        Raises:
            StoreError: the database failed.
        """
        if not self._may_claim():
            yield SqlOutboxBatch([])
            return
        batch = SqlOutboxBatch([])
        try:
            if self.db.is_postgres:
                failure: Exception | None = None
                async with self.db.transaction() as session:
                    batch.messages = await self._select(session, limit)
                    try:
                        yield batch
                    except Exception as exc:  # not cancellation: that rolls back, and the rows are claimed again
                        failure = exc
                    try:
                        await self._settle(session, batch)
                    except errors.StoreError as settle_error:
                        if failure is not None:
                            settle_error.add_note(f"while storing a relay round that failed with {failure!r}")
                        raise
                if failure is not None:
                    raise failure  # after the commit: what the broker confirmed stays marked
                return
            async with self.db.transaction(readonly=True) as session:
                batch.messages = await self._select(session, limit)
            try:
                yield batch
            finally:
                if batch.recorded:
                    async with self.db.transaction() as session:
                        await self._settle(session, batch)
        finally:
            self._landed(batch.messages)

    async def wait(self, max_wait: float) -> None:
        """Return on a commit notification (LISTEN or in-process) or after ``max_wait`` s."""
        if self._listener is not None:
            # Shielded: a wait cancelled while the LISTEN connection is being opened
            # must not drop that connection unclosed; close() awaits it and closes it.
            if self._listening is None or self._listening.done():
                self._listening = asyncio.ensure_future(self._listener.ensure())
            await asyncio.shield(self._listening)
        signal = self.db.outbox_signal
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(max_wait, 0.0)):
                await signal.wait()
        signal.clear()

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable row is due (0 if one is), None if none will be.

        Parked rows and the rows of waiting keys are not claimable; a waiting
        key's backing-off row is, at its due time. None while standing by.

        Raises:
            StoreError: the database failed.
        """
        if self._lock is not None and not self._lock.held:
            return None
        async with self.db.transaction(readonly=True) as session:
            earliest, now = (await session.execute(self._next_due)).one()
        if earliest is None:
            return None
        return max((as_utc(earliest) - as_utc(now)).total_seconds(), 0.0)

    async def stats(self) -> stores.OutboxStats:
        """Unsent rows (due, scheduled, parked) and the age of the oldest due, unparked one.

        Raises:
            StoreError: the database failed.
        """
        table = models.outbox
        now = models.utcnow()
        unsent = table.c.sent_at.is_(None)
        oldest = (
            sa.select(sa.func.min(table.c.available_at))
            .where(unsent, table.c.parked_at.is_(None), table.c.available_at <= now)
            .scalar_subquery()
        )
        figures = sa.select(
            sa.func.count(), sa.func.count(table.c.parked_at), sa.func.count(sa.case((outbox_admin.NOT_YET_DUE, 1))),
            oldest, now,
        ).where(unsent)  # fmt: skip
        async with self.db.transaction(readonly=True) as session:
            count, parked, scheduled, earliest, db_now = (await session.execute(figures)).one()
        age = 0.0 if earliest is None else max((as_utc(db_now) - as_utc(earliest)).total_seconds(), 0.0)
        due = int(count) - int(parked) - int(scheduled)
        return stores.OutboxStats(
            backlog=int(count), oldest_age=age, parked=int(parked), due=due, scheduled=int(scheduled)
        )

    async def entries(
        self, *, status: Literal["pending", "parked"] | None = None, topic: str | None = None, limit: int = 100
    ) -> list[stores.OutboxEntry]:
        """Unsent rows, oldest first (see :meth:`conveyor.stores.OutboxStore.entries`).

        Raises:
            StoreError: the database failed.
        """
        return await outbox_admin.entries(self.db, status=status, topic=topic, limit=limit)

    async def topics(self, limit: int = 1000) -> list[stores.TopicBacklog]:
        """Unsent and parked rows per topic (see :meth:`conveyor.stores.OutboxStore.topics`).

        Raises:
            StoreError: the database failed.
        """
        return await outbox_admin.topics(self.db, limit)

    async def get(self, message_id: str) -> stores.OutboxEntry:
        """The row of ``message_id``.

        Raises:
            NotFound: no row has this message id.
            StoreError: the database failed.
        """
        return await outbox_admin.get(self.db, message_id)

    async def retry(self, message_ids: Sequence[str] | None) -> int:
        """Make rows due now with no attempts (None: every parked row); return how many.

        Raises:
            NotFound: a given id is not an unsent row; nothing was changed.
            StoreError: the database failed.
        """
        return await outbox_admin.retry(self.db, message_ids)

    async def purge_parked(self, message_ids: Sequence[str] | None) -> int:
        """Delete parked rows (None: every parked row); return how many.

        Raises:
            NotFound: a given id is not a parked row; nothing was deleted.
            StoreError: the database failed.
        """
        return await outbox_admin.purge_parked(self.db, message_ids)

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
        """Close the LISTEN connection and release the SQLite relay lock; idempotent."""
        if self._lock is not None:
            self._lock.release()
        if self._listener is not None:
            if self._listening is not None:
                await asyncio.gather(self._listening, return_exceptions=True)
            await self._listener.close()
