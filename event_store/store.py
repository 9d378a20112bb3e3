"""The event store: streams with optimistic concurrency, a commit-ordered global log, snapshots.

**Commit order = position order.** A reader that tails ``events`` by position
must never skip a row whose transaction commits after a higher position became
visible. On PostgreSQL each append takes ``LOCK TABLE events IN EXCLUSIVE
MODE`` before it reads the stream's version and inserts, and keeps it to
commit, so appending transactions take positions one after the other in the
order they commit (the same approach as eventsourcing's PostgreSQL recorder,
which shares this table). ``EXCLUSIVE`` does not block readers (``ACCESS
SHARE``). The alternative, an ``xid8`` column read only below
``pg_snapshot_xmin(pg_current_snapshot())`` as watermill-sql does, lets
appends run in parallel but makes the read position a pair ``(xid, position)``
that neither eventsourcing's followers nor plain "last position seen" cursors
can use; appends here are short, so serialising them costs little. Keep the
append the last statement of a long transaction: the lock is held to commit.

On SQLite there is one writer at a time (``BEGIN IMMEDIATE``) and positions
are ``AUTOINCREMENT``, so commit order is position order there too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from conveyor import errors, stores
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, models
from event_store.outbox import as_utc

_LOCK_EVENTS = sa.text("LOCK TABLE events IN EXCLUSIVE MODE")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A stream's state at a version.

    Attributes:
        stream_id: the stream.
        version: the version of the last event the state includes.
        type: the snapshot's type (what to decode ``data`` as).
        data: the encoded state.
        metadata: JSON-compatible metadata.
    """

    stream_id: str
    version: int
    type: str
    data: bytes
    metadata: Mapping[str, Any]


def _recorded(row: sa.Row[Any]) -> stores.RecordedEvent:
    return stores.RecordedEvent(
        position=row.position,
        stream_id=row.stream_id,
        version=row.version,
        type=row.type,
        data=row.data,
        metadata=row.metadata or {},
        recorded_at=as_utc(row.recorded_at),
    )


_LOCKED = "conveyor_events_locked"
"""Session ``info`` entry: the transaction that holds the events lock (kept to its commit)."""
_SET_TIMEOUT = sa.text("SELECT current_setting('lock_timeout'), set_config('lock_timeout', :timeout, true)")
_RESTORE_TIMEOUT = sa.text("SELECT set_config('lock_timeout', :timeout, true)")


async def lock_events(session: AsyncSession, lock_timeout: float) -> None:
    """Serialise appends on PostgreSQL (see the module docstring); no-op on SQLite.

    The lock wait is bounded by ``lock_timeout``; the transaction's own
    ``lock_timeout`` is restored afterwards, so the caller's later statements
    keep theirs. The lock is taken once per transaction.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    transaction = session.sync_session.get_transaction()
    if transaction is not None and session.info.get(_LOCKED) is transaction:
        return
    previous = (await session.execute(_SET_TIMEOUT, {"timeout": f"{int(lock_timeout * 1000)}ms"})).scalar_one()
    await session.execute(_LOCK_EVENTS)
    await session.execute(_RESTORE_TIMEOUT, {"timeout": previous})
    session.info[_LOCKED] = session.sync_session.get_transaction()


class SqlEventStore:
    """Event store on the ``events`` and ``snapshots`` tables (:class:`conveyor.stores.EventStore`).

    Methods take an optional ``tx``: the caller's session inside its
    transaction; without it each call runs in a transaction of its own.

    Args:
        db: the database.
    """

    def __init__(self, db: database.Database) -> None:
        self.db = db

    def _session(self, tx: AsyncSession | None, *, readonly: bool = False) -> Any:
        if tx is not None:
            return _Joined(tx)
        return self.db.transaction(readonly=readonly)

    async def append(
        self,
        stream_id: str,
        events: Sequence[stores.NewEvent],
        *,
        expected_version: int | None,
        tx: AsyncSession | None = None,
    ) -> int:
        """Append events to a stream; return the stream's new version.

        Args:
            stream_id: the stream (up to 255 characters).
            events: the events, in order.
            expected_version: the stream's version the caller last saw (0: the
                stream must be new); None appends after the current version.
            tx: the caller's session inside its transaction, or None.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version`` (in
                ``tx``, the transaction must then be rolled back and retried).
            StoreError: the database failed (:class:`StoreUnavailable` if the
                events lock was not granted within ``lock_timeout``).
        """
        if not stream_id or len(stream_id) > 255:
            raise errors.ConfigurationError(f"stream id must be 1-255 characters, got {stream_id!r}")
        table = models.events
        async with self._session(tx) as session:
            await lock_events(session, self.db.lock_timeout)
            current = (
                await session.execute(sa.select(sa.func.max(table.c.version)).where(table.c.stream_id == stream_id))
            ).scalar() or 0
            if expected_version is not None and current != expected_version:
                raise errors.ConcurrencyConflict(
                    f"stream {stream_id!r} is at version {current}, expected {expected_version}"
                )
            if not events:
                return int(current)
            rows = [
                {
                    "stream_id": stream_id,
                    "version": current + offset,
                    "type": event.type,
                    "data": event.data,
                    "metadata": dict(event.metadata) if event.metadata else None,
                }
                for offset, event in enumerate(events, start=1)
            ]
            await session.execute(sa.insert(table), rows)
            return int(current) + len(rows)

    async def read_stream(
        self,
        stream_id: str,
        *,
        after_version: int = 0,
        limit: int | None = None,
        tx: AsyncSession | None = None,
    ) -> list[stores.RecordedEvent]:
        """Events of a stream with a version above ``after_version``, oldest first.

        Raises:
            StoreError: the database failed.
        """
        table = models.events
        query = (
            sa.select(table)
            .where(table.c.stream_id == stream_id, table.c.version > after_version)
            .order_by(table.c.version)
            .limit(limit)
        )
        async with self._session(tx, readonly=True) as session:
            return [_recorded(row) for row in (await session.execute(query)).all()]

    async def read_all(
        self, *, after: int = 0, limit: int = 1000, tx: AsyncSession | None = None
    ) -> list[stores.RecordedEvent]:
        """Committed events of every stream with a position above ``after``, in commit order.

        Raises:
            StoreError: the database failed.
        """
        table = models.events
        query = sa.select(table).where(table.c.position > after).order_by(table.c.position).limit(limit)
        async with self._session(tx, readonly=True) as session:
            return [_recorded(row) for row in (await session.execute(query)).all()]

    async def head(self, *, tx: AsyncSession | None = None) -> int:
        """The highest committed position (0 when the log is empty).

        Raises:
            StoreError: the database failed.
        """
        async with self._session(tx, readonly=True) as session:
            value = (await session.execute(sa.select(sa.func.max(models.events.c.position)))).scalar()
        return int(value or 0)

    async def save_snapshot(self, snapshot: Snapshot, *, tx: AsyncSession | None = None) -> None:
        """Store a snapshot; a second snapshot of the same stream and version is ignored.

        Raises:
            StoreError: the database failed.
        """
        table = models.snapshots
        async with self._session(tx) as session:
            insert = database.insert_for(session)
            await session.execute(
                insert(table)
                .values(
                    stream_id=snapshot.stream_id,
                    version=snapshot.version,
                    type=snapshot.type,
                    data=snapshot.data,
                    metadata=dict(snapshot.metadata) or None,
                )
                .on_conflict_do_nothing(index_elements=["stream_id", "version"])
            )

    async def load_snapshot(self, stream_id: str, *, tx: AsyncSession | None = None) -> Snapshot | None:
        """The newest snapshot of a stream, or None.

        Raises:
            StoreError: the database failed.
        """
        table = models.snapshots
        query = sa.select(table).where(table.c.stream_id == stream_id).order_by(table.c.version.desc()).limit(1)
        async with self._session(tx, readonly=True) as session:
            row = (await session.execute(query)).first()
        if row is None:
            return None
        return Snapshot(row.stream_id, row.version, row.type, row.data, row.metadata or {})


class _Joined:
    """Use the caller's session as is (no commit), translating driver errors."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._translating = database.translating()

    async def __aenter__(self) -> AsyncSession:
        self._translating.__enter__()
        return self._session

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return self._translating.__exit__(*exc_info)
