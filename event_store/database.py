"""The database: an async engine and sessions with each dialect's settings, and error translation.

Two dialects are supported:

* **SQLite** through aiosqlite (``sqlite+aiosqlite:///conveyor.db``, the
  embedded default): WAL journal, foreign keys on, a busy timeout, and every
  writing transaction opened with ``BEGIN IMMEDIATE`` so there is one writer at
  a time and a transaction that reads before it writes never fails to upgrade
  its lock (in WAL mode a deferred transaction whose snapshot went stale gets
  ``SQLITE_BUSY`` at once, whatever the busy timeout).
* **PostgreSQL** through asyncpg (``postgresql+asyncpg://...``).

Driver and SQLAlchemy errors never leave this package: :func:`translating`
turns them into :class:`~conveyor.errors.StoreError` (or its subclasses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import sqlalchemy as sa
from conveyor import errors
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

DEFAULT_URL = "sqlite+aiosqlite:///conveyor.db"
READONLY = "conveyor_readonly"
"""Execution option: on SQLite, open the transaction with a deferred ``BEGIN`` (no write lock)."""
OUTBOX_ADDED = "conveyor_outbox_added"
"""Session ``info`` flag set by :meth:`Outbox.add`; the commit then wakes in-process relays."""

log = logging.getLogger("conveyor.database")

POOL_SIZE_OPTION = "pool_size"
"""Database URL query option: connections the pool keeps (``...?pool_size=40``); removed before connecting."""
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}
_CONFLICT_STATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available


StoreUnavailable = errors.StoreUnavailable
"""The database is unreachable or busy (:class:`conveyor.errors.StoreUnavailable`)."""


def normalize_url(url: str | URL, *, sync: bool = False) -> URL:
    """Parse a database URL and pick Conveyor's driver for its dialect.

    ``postgresql://``, ``postgres://`` and ``postgresql+asyncpg://`` all mean
    PostgreSQL; ``sqlite://`` and ``sqlite+aiosqlite://`` mean SQLite.

    Args:
        url: a SQLAlchemy URL.
        sync: return the synchronous driver's URL (psycopg, sqlite3) instead
            of the async one.

    Raises:
        ConfigurationError: the URL cannot be parsed or names another database.
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        raise errors.ConfigurationError(f"invalid database URL {url!r}: {error}") from error
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in _ASYNC_DRIVERS:
        raise errors.ConfigurationError(
            f"unsupported database URL {parsed.render_as_string()!r}: use sqlite+aiosqlite:///FILE "
            "or postgresql+asyncpg://USER@HOST/DB"
        )
    if sync:  # the synchronous engines (eventsourcing recorders) size their own pools
        return parsed.set(drivername=_SYNC_DRIVERS[backend]).difference_update_query([POOL_SIZE_OPTION])
    return parsed.set(drivername=_ASYNC_DRIVERS[backend])


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL (one connection is the whole database)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def configure_sqlite(engine: sa.Engine, busy_timeout: float) -> None:
    """Install the SQLite connection settings and ``BEGIN IMMEDIATE`` on a (sync) engine.

    Used for the async engine's ``sync_engine`` and for the synchronous engine
    of the eventsourcing recorders, so both take the same locks.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the driver, open transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        readonly = connection.get_execution_options().get(READONLY, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def insert_for(session: AsyncSession) -> Any:
    """The dialect's ``insert`` construct (it has ``on_conflict_do_nothing``) for a session."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error wrapped by SQLAlchemy, if there is one."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            return None
        code = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(code, str):
            return code
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


_UNAVAILABLE_CLASSES = ("08", "53", "58", "XX")
"""SQLSTATE classes of an outage: connection exception, insufficient resources, system error, internal error."""
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "57P04", "57P05"}  # shutdown, crash, cannot connect now, ...
_STATEMENT_CLASSES = ("21", "22", "23", "25", "26", "28", "2B", "34", "3D", "3F", "42", "44", "P0")
"""SQLSTATE classes that blame the statement: cardinality, data, integrity, transaction state, names, syntax."""
_STATEMENT_STATES = {"57014", "0A000"}  # the statement's own timeout (or a cancel), feature not supported
_SQLITE_UNAVAILABLE = {
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_NOMEM", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CORRUPT",
    "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL", "SQLITE_NOTADB", "SQLITE_INTERRUPT",
}  # fmt: skip
"""SQLite primary result codes of a database that cannot serve anyone now (locked, unreadable, full)."""


def _sqlite_code(error: BaseException) -> str | None:
    """The primary SQLite result code (``SQLITE_ERROR``, ``SQLITE_BUSY``...) of a wrapped sqlite3 error, if any."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            return None
        code = getattr(seen, "sqlite_errorcode", None)
        if isinstance(code, int):
            return _SQLITE_PRIMARY.get(code & 0xFF, f"SQLITE_{code & 0xFF}")
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


_SQLITE_PRIMARY = {
    1: "SQLITE_ERROR", 2: "SQLITE_INTERNAL", 3: "SQLITE_PERM", 4: "SQLITE_ABORT", 5: "SQLITE_BUSY",
    6: "SQLITE_LOCKED", 7: "SQLITE_NOMEM", 8: "SQLITE_READONLY", 9: "SQLITE_INTERRUPT", 10: "SQLITE_IOERR",
    11: "SQLITE_CORRUPT", 12: "SQLITE_NOTFOUND", 13: "SQLITE_FULL", 14: "SQLITE_CANTOPEN", 15: "SQLITE_PROTOCOL",
    16: "SQLITE_EMPTY", 17: "SQLITE_SCHEMA", 18: "SQLITE_TOOBIG", 19: "SQLITE_CONSTRAINT", 20: "SQLITE_MISMATCH",
    21: "SQLITE_MISUSE", 22: "SQLITE_NOLFS", 23: "SQLITE_AUTH", 24: "SQLITE_FORMAT", 25: "SQLITE_RANGE",
    26: "SQLITE_NOTADB",
}  # fmt: skip
"""SQLite's primary result codes (the low byte of an extended code), from sqlite3.h."""


def translate(error: BaseException) -> errors.StoreError:
    """Map a SQLAlchemy/driver exception to Conveyor's error tree, by its class and code, never its text.

    * :class:`~conveyor.errors.ConcurrencyConflict`: serialization failure
      (40001), deadlock (40P01), lock not available (55P03).
    * :class:`StoreUnavailable`: SQLSTATE classes 08 (connection), 53
      (resources), 58 (system), XX (internal), 57P01-57P05 (shutdown, cannot
      connect now); SQLite ``BUSY``/``LOCKED``/``IOERR``/``FULL``/``CANTOPEN``...;
      a connection the driver lost or never opened (no code at all), a pool
      that cannot hand out a connection, ``OSError``.
    * :class:`~conveyor.errors.StatementError`: classes 22 (data), 23
      (integrity), 42 (syntax, undefined column) and the like, 57014 (the
      statement's own timeout); SQLite ``ERROR``/``CONSTRAINT``/``MISMATCH``...;
      a DBAPI ``IntegrityError``/``ProgrammingError``/``DataError`` without a code.
    * :class:`~conveyor.errors.StoreError`: anything else.
    """
    text = " ".join(str(getattr(error, "orig", None) or error).split())[:500]
    state = sqlstate(error)
    if state is not None:
        if state in _CONFLICT_STATES:
            return errors.ConcurrencyConflict(f"concurrent update: {text}")
        if state.startswith(_UNAVAILABLE_CLASSES) or state in _UNAVAILABLE_STATES:
            return StoreUnavailable(f"database unavailable ({state}): {text}")
        if state.startswith(_STATEMENT_CLASSES) or state in _STATEMENT_STATES:
            return errors.StatementError(f"the database refused a statement ({state}): {text}", state)
        return errors.StoreError(f"database error ({state}): {text}")
    code = _sqlite_code(error)
    if code is not None:
        if code in _SQLITE_UNAVAILABLE:
            return StoreUnavailable(f"database unavailable ({code}): {text}")
        return errors.StatementError(f"the database refused a statement ({code}): {text}", "sqlite:" + code)
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return StoreUnavailable(f"database connection lost: {text}")
    if isinstance(error, exc.IntegrityError | exc.ProgrammingError | exc.DataError):
        return errors.StatementError(f"the database refused a statement: {text}")
    if isinstance(error, exc.InterfaceError | exc.OperationalError | exc.TimeoutError | OSError):
        return StoreUnavailable(f"database unavailable: {text}")
    if is_driver_error(error) and type(error).__name__ not in _STATEMENT_ERRORS:
        return StoreUnavailable(f"database connection failed: {text}")
    return errors.StoreError(f"database error: {text}")


def is_driver_error(error: BaseException) -> bool:
    """Whether ``error`` is a DBAPI-level exception raised outside SQLAlchemy's wrapping.

    The driver's own (asyncpg, aiosqlite, sqlite3), and those of SQLAlchemy's
    async adapters, which are DBAPI emulations, not ``SQLAlchemyError``: a
    statement sent straight to the driver (:mod:`event_store.direct`), or the
    adapter starting a transaction for one, raises them as they are.
    """
    if isinstance(error, _EMULATED):
        return True
    return type(error).__module__.startswith(_DRIVER_MODULES)


_EMULATED: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(exc, "EmulatedDBAPIException", None),) if isinstance(e, type)
)
_STATEMENT_ERRORS = frozenset({"IntegrityError", "ProgrammingError", "DataError", "NotSupportedError"})
"""DBAPI error classes that blame the statement, not the connection."""
_DRIVER_MODULES = ("asyncpg", "aiosqlite", "sqlite3", "sqlalchemy.dialects.", "sqlalchemy.connectors.")


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Re-raise SQLAlchemy and driver errors raised inside as :class:`StoreError`.

    A driver error without a SQLSTATE (the connection closed, or never opened)
    is :class:`StoreUnavailable`: an outage, not the message's fault.
    """
    try:
        yield
    except errors.ConveyorError:
        raise
    except (exc.SQLAlchemyError, OSError, ConnectionError) as error:
        raise translate(error) from error
    except Exception as error:
        if not is_driver_error(error):
            raise
        raise translate(error) from error


ROLLBACK_TIMEOUT = 5.0
"""Seconds a rollback may take before its connection is dropped instead (a frozen network never answers)."""


async def discard(session: AsyncSession, *, drop: bool = False) -> None:
    """Close a session, rolling back what it left open; a broken or doubtful connection is dropped.

    Args:
        session: the session.
        drop: drop the connection instead of rolling back on it: its statement
            was cancelled or timed out, so its state is unknown (asyncpg would
            otherwise run the next transaction on it as a savepoint of one that
            nobody commits). Closing the connection rolls back on the server.
    """
    if not drop:
        try:
            async with asyncio.timeout(ROLLBACK_TIMEOUT):
                await session.close()
            return
        except TimeoutError:
            log.warning("a rollback took over %.0fs; dropping its connection", ROLLBACK_TIMEOUT)
        except Exception as error:
            if not isinstance(error, exc.SQLAlchemyError | OSError | ConnectionError) and not is_driver_error(error):
                raise
    with contextlib.suppress(exc.SQLAlchemyError, OSError, ConnectionError):
        await session.invalidate()


def doubtful(error: BaseException | None) -> bool:
    """Whether a connection on which ``error`` happened is in an unknown state and must be dropped.

    A statement cancelled or timed out (the handler's deadline, a drain) may
    have reached the server or not; an outage-class error means the connection
    itself failed. Only a statement the database refused leaves it usable.
    """
    if error is None:
        return False
    if not isinstance(error, Exception) or isinstance(error, TimeoutError | OSError | errors.StoreUnavailable):
        return True
    if isinstance(error, exc.SQLAlchemyError) or is_driver_error(error):
        return isinstance(translate(error), StoreUnavailable)
    return False


def _driver_of(connection: Any) -> Any:
    """The driver's own connection under a DBAPI (adapter) connection."""
    return getattr(connection, "driver_connection", None) or getattr(connection, "_connection", None)


def in_transaction(driver: Any) -> bool:
    """Whether a driver connection is inside a transaction, as the driver knows it (no I/O).

    asyncpg: the server's transaction status from its last ReadyForQuery, or a
    transaction block asyncpg still tracks (``_top_xact``: one whose ``BEGIN``
    was cancelled stays there, and every later transaction on the connection
    would be a savepoint of it). aiosqlite/sqlite3: ``in_transaction``.
    """
    probe = getattr(driver, "is_in_transaction", None)
    if callable(probe):
        return bool(probe()) or getattr(driver, "_top_xact", None) is not None
    try:
        return bool(getattr(driver, "in_transaction", False))
    except ValueError:  # aiosqlite: the connection is closed (the pool let an overflow connection go)
        return False


def _refuse_unclean(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout guard: a connection left inside a transaction is never handed out again."""
    if in_transaction(_driver_of(dbapi_connection)):
        log.warning("dropping a pooled database connection left inside a transaction")
        raise exc.DisconnectionError("connection left inside a transaction")


async def commit(session: AsyncSession) -> None:
    """Commit the session's transaction and prove it: afterwards the driver must be out of any transaction.

    A "commit" that only released a savepoint (a connection reused in an
    unknown state) leaves the driver inside a transaction: that is an outage,
    never a success, and the connection is dropped (which rolls it back).

    Raises:
        StoreError: the commit failed (translated); :class:`StoreUnavailable`
            when it cannot be proven.
    """
    with translating():
        connection = await session.connection()
        driver = _driver_of(connection.sync_connection.connection.dbapi_connection)  # type: ignore[union-attr]
        await session.commit()
    if driver is not None and in_transaction(driver):
        with contextlib.suppress(Exception):
            terminate = getattr(driver, "terminate", None)
            if callable(terminate):
                terminate()
        raise StoreUnavailable("the commit could not be proven: the connection is still inside a transaction")


DEFAULT_POOL_SIZE = 5
BACKGROUND_CONNECTIONS = 4
"""Connections a process needs besides its handlers: the relay's claim and mark (2), the scheduler, readiness."""


def pool_size_for(concurrency: int) -> int:
    """The pool a process needs: one connection per concurrent handler attempt, plus the background ones.

    Args:
        concurrency: the process's total handler concurrency (the sum over its handlers).
    """
    return max(concurrency, 0) + BACKGROUND_CONNECTIONS


def _pool_option(url: URL) -> tuple[URL, int | None]:
    """Split the ``pool_size`` query option off a URL.

    Raises:
        ConfigurationError: the option is not a positive integer.
    """
    value = url.query.get(POOL_SIZE_OPTION)
    if value is None:
        return url, None
    text = value if isinstance(value, str) else value[-1]
    if not text.isdigit() or int(text) < 1:
        raise errors.ConfigurationError(
            f"database URL option {POOL_SIZE_OPTION}={text!r} must be a positive integer (connections in the pool)"
        )
    return url.difference_update_query([POOL_SIZE_OPTION]), int(text)


class Database:
    """An async engine and session factory for one database URL.

    The pool (PostgreSQL, file SQLite) holds ``pool_size`` connections, and as
    many again in overflow. Its size is, by precedence: the URL option
    ``?pool_size=N``, the ``pool_size`` argument, :data:`DEFAULT_POOL_SIZE`; and
    never less than :func:`pool_size_for` ``concurrency``, since a handler
    attempt holds a connection for its whole transaction: a pool smaller than
    the process's handler concurrency makes attempts queue for connections.

    Args:
        url: SQLAlchemy URL (see :func:`normalize_url`); default
            ``sqlite+aiosqlite:///conveyor.db``.
        pool_size: connections kept open (PostgreSQL, file SQLite).
        concurrency: the process's total handler concurrency; the pool is at
            least :func:`pool_size_for` it.
        busy_timeout: SQLite: seconds to wait for the write lock.
        lock_timeout: PostgreSQL: seconds an event append waits for the
            events table lock before failing with :class:`StoreUnavailable`.
        echo: log SQL statements.

    Raises:
        ConfigurationError: invalid or unsupported URL; a URL ``pool_size``
            below what ``concurrency`` needs.
    """

    def __init__(
        self,
        url: str | URL = DEFAULT_URL,
        *,
        pool_size: int | None = None,
        concurrency: int = 0,
        busy_timeout: float = 30.0,
        lock_timeout: float = 30.0,
        echo: bool = False,
    ) -> None:
        self.url, option = _pool_option(normalize_url(url))
        needed = pool_size_for(concurrency) if concurrency > 0 else 0
        if option is not None and option < needed:
            log.warning(
                "database URL option %s=%d is below the %d connections this process may use at once (handler "
                "concurrency %d + %d for the relay, scheduler and readiness): handlers will wait for connections",
                POOL_SIZE_OPTION, option, needed, concurrency, BACKGROUND_CONNECTIONS,
            )  # fmt: skip
        self.pool_size = option if option is not None else max(pool_size or DEFAULT_POOL_SIZE, needed)
        """Connections the pool keeps open (as many more may overflow)."""
        self.dialect = self.url.get_backend_name()
        self.lock_timeout = lock_timeout
        kwargs: dict[str, Any] = {"echo": echo}
        if is_memory_sqlite(self.url):
            kwargs["poolclass"] = StaticPool
        else:
            kwargs.update(pool_size=self.pool_size, max_overflow=self.pool_size, pool_pre_ping=False)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            configure_sqlite(self.engine.sync_engine, busy_timeout)
        event.listen(self.engine.sync_engine.pool, "checkout", _refuse_unclean)
        # A Session class of our own, so commit hooks apply to our sessions only.
        session_class = type("ConveyorSession", (Session,), {})
        event.listen(session_class, "after_commit", self._after_commit)
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=session_class
        )
        self._readonly_sessions = async_sessionmaker(
            self.engine.execution_options(**{READONLY: True}),
            expire_on_commit=False,
            sync_session_class=session_class,
        )
        self.outbox_signal = asyncio.Event()
        """Set when a session of this database committed outbox rows (in-process wake-up)."""

    @property
    def is_sqlite(self) -> bool:
        """True on SQLite."""
        return self.dialect == "sqlite"

    @property
    def is_postgres(self) -> bool:
        """True on PostgreSQL."""
        return self.dialect == "postgresql"

    def display_url(self) -> str:
        """The URL with the password hidden, for messages and logs."""
        return self.url.render_as_string(hide_password=True)

    def _after_commit(self, session: Session) -> None:
        if session.info.pop(OUTBOX_ADDED, False):
            self.outbox_signal.set()

    @contextlib.asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[AsyncSession]:
        """A session in a new transaction, committed on success and rolled back on error.

        Errors the database raises (inside the block or at commit) are
        translated; an exception of the caller's own propagates unchanged, so
        an ``OSError`` from the caller's HTTP call is never taken for a
        database outage.

        Args:
            readonly: a transaction that only reads (on SQLite it then takes
                no write lock).

        Raises:
            StoreError: the database failed; :class:`StoreUnavailable` when it is
                unreachable or busy, :class:`~conveyor.errors.ConcurrencyConflict`
                on a conflicting concurrent write.
        """
        factory = self._readonly_sessions if readonly else self.sessions
        session = factory()
        failure: BaseException | None = None
        try:
            with translating():
                await session.begin()
            try:
                yield session
            except exc.SQLAlchemyError as error:
                raise translate(error) from error
            await commit(session)
        except BaseException as error:
            failure = error
            raise
        finally:
            await discard(session, drop=doubtful(failure))

    async def check(self, *, write: bool = False) -> None:
        """Verify the database answers now (for readiness, and the probe that proves an outage).

        Args:
            write: the database must take a write now: on SQLite the probe
                takes the write lock (a lock held elsewhere is an outage for a
                writer even though reads still answer).

        Raises:
            StoreUnavailable: it does not, with the reason.
        """
        try:
            async with self.transaction(readonly=not write) as session:
                await session.execute(sa.text("SELECT 1"))
        except errors.StoreError as error:
            raise StoreUnavailable(f"database {self.display_url()} is not reachable: {error}") from error

    async def close(self) -> None:
        """Close every pooled connection; idempotent."""
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
