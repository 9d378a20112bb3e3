"""The in-memory database: committed tables, and transactions that buffer their writes until commit.

A :class:`MemoryDatabase` holds named tables (``dict`` of key to value). A
:class:`MemoryTx` reads through its own buffered writes to the committed
tables (read committed, read-your-writes) and applies the buffer atomically at
commit; a rollback drops it; :meth:`MemoryTx.savepoint` restores the buffer as
it was when its block raises. Every write takes a lock on its row
``(table, key)`` until the transaction ends, the way a row lock or a unique
index does in SQL: a second transaction writing the same row waits for the
first one to end, then sees what it committed. A cycle of such waits (a
deadlock) fails the transaction that closes it with
:class:`~conveyor.errors.ConcurrencyConflict`.

``fault`` is a test hook: an async callable given the name of every
operation, and its transaction when it has one (a test finds its own labels
in :attr:`MemoryTx.labels`), (``"begin"``, ``"commit"``, ``"commit.after"``, ``"write"``,
``"read"``, ``"inbox.claim"``, ...) before it runs; what it raises is what the
operation raises, and a hook that sleeps makes the operation hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from conveyor import errors

Fault = Callable[[str, "MemoryTx | None"], Awaitable[None]]
"""A fault hook: awaited with an operation's name (and its transaction, if any) before the operation runs."""

DELETED: Any = object()
"""A buffered delete."""


def system_now() -> datetime:
    """The host's clock, aware UTC."""
    return datetime.now(UTC)


class MemoryDatabase:
    """Committed tables, row locks and transactions (:class:`conveyor.persistence.Database`).

    Args:
        now: the database clock (aware UTC); a test passes a virtual one.
        fault: the fault hook (see the module docstring).
    """

    def __init__(self, now: Callable[[], datetime] = system_now, fault: Fault | None = None) -> None:
        self.tables: dict[str, dict[Any, Any]] = {}
        self.now = now
        self.fault = fault
        self.committed = 0
        """Transactions committed so far."""
        self.ids = itertools.count(1)
        """Auto-increment values (outbox rows, runs, held dead letters): unique, in allocation order."""
        self._locks: dict[tuple[str, Any], MemoryTx] = {}
        self._waits: dict[MemoryTx, MemoryTx] = {}
        self._after_commit: list[Callable[[MemoryTx], None]] = []
        self.closed = False
        self.shared: dict[str, Any] = {}
        """State the stores of this database share (the open relay claims)."""

    def table(self, name: str) -> dict[Any, Any]:
        """The committed rows of ``name`` (created empty on first use)."""
        return self.tables.setdefault(name, {})

    def on_commit(self, callback: Callable[[MemoryTx], None]) -> None:
        """Call ``callback(tx)`` after every commit (the outbox signals its relays so)."""
        self._after_commit.append(callback)

    async def hook(self, operation: str, tx: MemoryTx | None = None) -> None:
        """Run the fault hook for ``operation`` (in ``tx``), if any.

        Raises:
            StoreError: whatever the hook raises (the injected fault).
        """
        if self.closed:
            raise errors.StoreUnavailable("the memory database is closed")
        if self.fault is not None:
            await self.fault(operation, tx)

    def begin(self) -> MemoryTx:
        """A new open transaction (no fault hook: see :meth:`transaction`)."""
        return MemoryTx(self)

    @contextlib.asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[MemoryTx]:
        """Open a transaction; commit when the block exits normally, roll back if it raises.

        Raises:
            StoreError: the database failed to begin or commit.
        """
        await self.hook("begin")
        tx = MemoryTx(self)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise
        await tx.commit()

    async def check(self) -> None:
        """Readiness: the database answers unless closed (or the hook says otherwise)."""
        await self.hook("check")

    async def close(self) -> None:
        """Refuse further operations; idempotent."""
        self.closed = True

    def display_url(self) -> str:
        """A name for logs."""
        return "memory://"

    # -- locks ---------------------------------------------------------------------

    async def lock(self, tx: MemoryTx, table: str, key: Any) -> None:
        """Take the row lock ``(table, key)`` for ``tx``; wait while another open transaction holds it.

        Raises:
            ConcurrencyConflict: waiting would close a cycle of waits (a deadlock).
        """
        row = (table, key)
        while True:
            holder = self._locks.get(row)
            if holder is None or holder is tx:
                self._locks[row] = tx
                tx.locks.add(row)
                return
            if self._would_deadlock(tx, holder):
                raise errors.ConcurrencyConflict(f"deadlock detected on {table} {key!r}")
            self._waits[tx] = holder
            try:
                await holder.ended.wait()
            finally:
                self._waits.pop(tx, None)

    def _would_deadlock(self, tx: MemoryTx, holder: MemoryTx) -> bool:
        seen: set[MemoryTx] = set()
        current: MemoryTx | None = holder
        while current is not None and current not in seen:
            if current is tx:
                return True
            seen.add(current)
            current = self._waits.get(current)
        return False

    def release(self, tx: MemoryTx) -> None:
        """Free every lock of ``tx`` and wake its waiters."""
        for row in tx.locks:
            if self._locks.get(row) is tx:
                del self._locks[row]
        tx.locks.clear()
        tx.ended.set()

    def apply(self, tx: MemoryTx) -> None:
        """Apply ``tx``'s buffered writes to the committed tables, at once."""
        for name, rows in tx.writes.items():
            table = self.table(name)
            for key, value in rows.items():
                if value is DELETED:
                    table.pop(key, None)
                else:
                    table[key] = value
        self.committed += 1
        for callback in self._after_commit:
            callback(tx)


class MemoryTx:
    """An open transaction: buffered writes over the committed tables.

    Attributes:
        writes: the buffered writes, per table, in write order.
        locks: the rows it has locked.
        before_commit: callbacks run at commit, before the writes apply (they may add writes).
        open: False once committed or rolled back.
        labels: free-form labels a caller puts on the transaction (a test's fault hook reads them).
    """

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db
        self.writes: dict[str, dict[Any, Any]] = {}
        self.locks: set[tuple[str, Any]] = set()
        self.ended = asyncio.Event()
        self.before_commit: list[Callable[[MemoryTx], None]] = []
        self.open = True
        self.labels: dict[str, Any] = {}

    def _check_open(self) -> None:
        if not self.open:
            raise errors.StoreUnavailable("the transaction is closed")

    def get(self, table: str, key: Any, default: Any = None) -> Any:
        """The row as this transaction sees it (its own writes first), or ``default``."""
        buffered = self.writes.get(table, {})
        if key in buffered:
            value = buffered[key]
            return default if value is DELETED else value
        return self.db.table(table).get(key, default)

    def rows(self, table: str) -> Iterator[tuple[Any, Any]]:
        """Every row of ``table`` as this transaction sees it: committed rows, then its own new ones."""
        buffered = self.writes.get(table, {})
        for key, value in self.db.table(table).items():
            current = buffered.get(key, value)
            if current is not DELETED:
                yield key, current
        committed = self.db.table(table)
        for key, value in buffered.items():
            if key not in committed and value is not DELETED:
                yield key, value

    async def read(self, table: str, key: Any, default: Any = None) -> Any:
        """:meth:`get` as a statement (the fault hook runs).

        Raises:
            StoreError: an injected fault.
        """
        self._check_open()
        await self.db.hook("read", self)
        return self.get(table, key, default)

    async def put(self, table: str, key: Any, value: Any) -> None:
        """Write a row (insert or replace) once its lock is taken.

        Raises:
            StoreError: an injected fault, or a deadlock (ConcurrencyConflict).
        """
        self._check_open()
        await self.db.hook("write", self)
        await self.db.lock(self, table, key)
        self.writes.setdefault(table, {})[key] = value

    async def insert(self, table: str, key: Any, value: Any) -> None:
        """Insert a row; a row with this key is a unique-key violation.

        Raises:
            StatementError: the key exists (committed, or written by this transaction).
            StoreError: an injected fault, or a deadlock.
        """
        self._check_open()
        await self.db.hook("write", self)
        await self.db.lock(self, table, key)
        if self.get(table, key) is not None:
            raise errors.StatementError(f"duplicate key {key!r} in {table}", sqlstate="23505")
        self.writes.setdefault(table, {})[key] = value

    async def delete(self, table: str, key: Any) -> None:
        """Delete a row (nothing if absent).

        Raises:
            StoreError: an injected fault, or a deadlock.
        """
        self._check_open()
        await self.db.hook("write", self)
        await self.db.lock(self, table, key)
        self.writes.setdefault(table, {})[key] = DELETED

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested scope: if the block raises, its writes are undone (its locks are kept, as in SQL)."""
        saved = {name: dict(rows) for name, rows in self.writes.items()}
        try:
            yield
        except BaseException:
            self.writes = saved
            raise

    async def commit(self) -> None:
        """Apply the writes at once and end the transaction.

        Raises:
            StoreError: an injected fault before the commit (nothing applied; rolled back)
                or after it (``commit.after``: applied, but the caller is not told so).
        """
        self._check_open()
        try:
            await self.db.hook("commit", self)
            for callback in self.before_commit:
                callback(self)
        except BaseException:
            self.rollback()
            raise
        self.open = False
        self.db.apply(self)
        self.db.release(self)
        await self.db.hook("commit.after", self)

    def rollback(self) -> None:
        """Drop the writes and end the transaction; idempotent."""
        if self.open:
            self.open = False
            self.writes.clear()
            self.db.release(self)
