"""The relay's side of the in-memory outbox (:class:`conveyor.stores.OutboxStore`).

Claims follow the SQL stores' rules: a key *waits* while its oldest unsent
row is backing off after a refused publish or is parked; a delayed row never
attempted holds back nothing; a claim takes, per key, a prefix of that key's
claimable rows, and never a row or a key that is in another open claim of any
relay on this database (the in-flight set plays PostgreSQL's row locks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from conveyor import errors, stores
from conveyor.memory_persistence.handling import OUTBOX, OUTBOX_IDS, OutboxRow
from conveyor.memory_persistence.tables import MemoryDatabase, MemoryTx


@dataclass
class InFlight:
    """Ids and keys of every open claim on one database."""

    ids: set[int] = field(default_factory=set)
    keys: collections.Counter[str] = field(default_factory=collections.Counter)
    signal: asyncio.Event | None = None


MemoryOutboxBatch = stores.RecordedBatch
"""A claim of :class:`MemoryOutboxStore` (:class:`conveyor.stores.RecordedBatch`)."""


class MemoryOutboxStore:
    """The relay's side of the outbox on a :class:`MemoryDatabase`.

    Args:
        db: the database.
        flight: the open claims of every relay of ``db``.
        per_key: most rows of one key in one claim.
    """

    concurrent_claims = True

    def __init__(self, db: MemoryDatabase, flight: InFlight, *, per_key: int = 16) -> None:
        self.db = db
        self.flight = flight
        self.per_key = per_key
        if flight.signal is None:
            flight.signal = asyncio.Event()
            signal = flight.signal
            db.on_commit(lambda tx: signal.set() if OUTBOX in tx.writes else None)

    def _unsent(self) -> list[OutboxRow]:
        rows: dict[int, OutboxRow] = self.db.table(OUTBOX)
        return [rows[i] for i in sorted(rows) if rows[i].sent_at is None]

    def _claimable(self, now: datetime) -> tuple[list[OutboxRow], list[OutboxRow]]:
        """Due claimable rows (per-key prefixes, in outbox order), and the waiting keys' backing-off rows."""
        taken: list[OutboxRow] = []
        backing_off: list[OutboxRow] = []
        stopped: set[str] = set()
        per_key: collections.Counter[str] = collections.Counter()
        for row in self._unsent():
            key, message = row.message.key, row.message
            if key is not None and (key in stopped or self.flight.keys[key]):
                continue
            if message.id in self.flight.ids:
                continue
            waits = row.parked_at is not None or (message.attempts > 0 and row.available_at > now)
            if waits:
                if row.parked_at is None:
                    backing_off.append(row)
                if key is not None:
                    stopped.add(key)
                continue
            if row.available_at > now:
                continue  # delayed, never attempted: holds back nothing
            if key is not None:
                if per_key[key] >= self.per_key:
                    stopped.add(key)
                    continue
                per_key[key] += 1
            taken.append(row)
        return taken, backing_off

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[MemoryOutboxBatch]:
        """Claim up to ``limit`` due rows; on exit store what was recorded (not after a cancellation).

        Raises:
            StoreError: an injected fault (nothing claimed, or nothing marked).
        """
        await self.db.hook("relay.claim")
        rows, _ = self._claimable(self.db.now())
        batch = MemoryOutboxBatch([row.message for row in rows[:limit]])
        self.flight.ids.update(m.id for m in batch.messages)
        self.flight.keys.update(m.key for m in batch.messages if m.key is not None)
        try:
            failure: Exception | None = None
            try:
                yield batch
            except Exception as exc:
                failure = exc
            async with self.db.transaction() as tx:
                await self.db.hook("relay.mark")
                await self._settle(tx, batch)
            if failure is not None:
                raise failure
        finally:
            self.flight.ids.difference_update(m.id for m in batch.messages)
            self.flight.keys.subtract(m.key for m in batch.messages if m.key is not None)
            self.flight.keys += collections.Counter()

    async def _settle(self, tx: MemoryTx, batch: MemoryOutboxBatch) -> None:
        now = self.db.now()

        async def move(row_id: int, **changes: object) -> None:
            row: OutboxRow | None = tx.get(OUTBOX, row_id)
            if row is not None:
                await tx.put(OUTBOX, row_id, row.moved(**changes))

        for row_id in batch.sent_ids:
            await move(row_id, sent_at=now)
        for row_id, error, retry_in in batch.failures:
            attempts = tx.get(OUTBOX, row_id).message.attempts + 1
            await move(row_id, attempts=attempts, last_error=error, available_at=now + timedelta(seconds=retry_in))
        for row_id, error in batch.parkings:
            attempts = tx.get(OUTBOX, row_id).message.attempts + 1
            await move(row_id, attempts=attempts, last_error=error, parked_at=now)
        for row_id, error in batch.interruptions:
            await move(row_id, last_error=error)

    async def wait(self, max_wait: float) -> None:
        """Return when a commit added outbox rows, or after ``max_wait`` seconds."""
        signal = self.flight.signal
        assert signal is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                await signal.wait()
        signal.clear()

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable row is due (0 if one is), None if none will be."""
        await self.db.hook("relay.read")
        now = self.db.now()
        rows, backing_off = self._claimable(now)
        if rows:
            return 0.0
        later = [r.available_at for r in self._unsent() if r.parked_at is None and r.available_at > now]
        later = [t for t in later if t is not None] + [r.available_at for r in backing_off]
        return None if not later else max((min(later) - now).total_seconds(), 0.0)

    async def stats(self) -> stores.OutboxStats:
        """Backlog, parked rows and the age of the oldest unsent due row."""
        await self.db.hook("relay.read")
        now = self.db.now()
        unsent = self._unsent()
        due = [r.available_at for r in unsent if r.parked_at is None and r.available_at <= now]
        oldest = (now - min(due)).total_seconds() if due else 0.0
        return stores.OutboxStats(len(unsent), oldest, sum(1 for r in unsent if r.parked_at is not None))

    @staticmethod
    def _entry(row: OutboxRow) -> stores.OutboxEntry:
        status: stores.OutboxStatus = (
            "sent" if row.sent_at is not None else "parked" if row.parked_at is not None else "pending"
        )
        return stores.OutboxEntry(row.message, status, row.available_at, row.last_error, row.parked_at, row.sent_at)

    async def entries(
        self, *, status: Literal["pending", "parked"] | None = None, topic: str | None = None, limit: int = 100
    ) -> list[stores.OutboxEntry]:
        """Unsent rows in outbox order."""
        await self.db.hook("relay.read")
        found = [self._entry(r) for r in self._unsent() if topic is None or r.message.topic == topic]
        return [e for e in found if status is None or e.status == status][:limit]

    async def topics(self, limit: int = 1000) -> list[stores.TopicBacklog]:
        """Every topic with unsent rows, by name."""
        await self.db.hook("relay.read")
        unsent: collections.Counter[str] = collections.Counter()
        parked: collections.Counter[str] = collections.Counter()
        for row in self._unsent():
            unsent[row.message.topic] += 1
            parked[row.message.topic] += row.parked_at is not None
        return [stores.TopicBacklog(t, unsent[t], parked[t]) for t in sorted(unsent)][:limit]

    def _by_message_id(self, message_id: str) -> OutboxRow:
        row_id = self.db.table(OUTBOX_IDS).get(message_id)
        row: OutboxRow | None = None if row_id is None else self.db.table(OUTBOX).get(row_id)
        if row is None:
            raise errors.NotFound(f"no outbox row has message id {message_id!r}")
        return row

    async def get(self, message_id: str) -> stores.OutboxEntry:
        """The row of ``message_id``, whatever its status.

        Raises:
            NotFound: no row has this id.
        """
        await self.db.hook("relay.read")
        return self._entry(self._by_message_id(message_id))

    async def retry(self, message_ids: Sequence[str] | None) -> int:
        """Make rows due now with no attempts spent, un-parking them; return how many.

        Raises:
            NotFound: a given id is not an unsent row (nothing changed).
        """
        if message_ids is None:
            rows = [r for r in self._unsent() if r.parked_at is not None]
        else:
            rows = [self._by_message_id(i) for i in message_ids]
            if any(r.sent_at is not None for r in rows):
                raise errors.NotFound("a given message id is not an unsent outbox row")
        async with self.db.transaction() as tx:
            for row in rows:
                await tx.put(OUTBOX, row.message.id, row.moved(attempts=0, parked_at=None, available_at=self.db.now()))
        return len(rows)

    async def purge_parked(self, message_ids: Sequence[str] | None) -> int:
        """Delete parked rows; return how many.

        Raises:
            NotFound: a given id is not a parked row (nothing deleted).
        """
        if message_ids is None:
            rows = [r for r in self._unsent() if r.parked_at is not None]
        else:
            rows = [self._by_message_id(i) for i in message_ids]
            if any(r.parked_at is None or r.sent_at is not None for r in rows):
                raise errors.NotFound("a given message id is not a parked outbox row")
        return await self._delete(rows)

    async def _delete(self, rows: Sequence[OutboxRow]) -> int:
        async with self.db.transaction() as tx:
            for row in rows:
                await tx.delete(OUTBOX, row.message.id)
                await tx.delete(OUTBOX_IDS, row.message.message_id)
        return len(rows)

    async def purge(self, older_than: timedelta) -> int:
        """Delete rows sent more than ``older_than`` ago; return how many."""
        await self.db.hook("relay.purge")
        cutoff = self.db.now() - older_than
        rows: dict[int, OutboxRow] = self.db.table(OUTBOX)
        return await self._delete([r for r in rows.values() if r.sent_at is not None and r.sent_at < cutoff])

    async def close(self) -> None:
        """Nothing to release."""
