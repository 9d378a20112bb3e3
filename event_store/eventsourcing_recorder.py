"""A persistence module for the ``eventsourcing`` library, on Conveyor's tables.

Point an :class:`eventsourcing.application.Application` at it and its
aggregates live in the same database as the outbox and the handlers' data::

    PERSISTENCE_MODULE=event_store.eventsourcing_recorder
    CONVEYOR_DATABASE_URL=postgresql+asyncpg://app@db/app   # or sqlite+aiosqlite:///conveyor.db

Mapping: aggregate events go to ``events`` (originator id = ``stream_id``,
originator version = ``version``, topic = ``type``, state = ``data``; the
notification id is the global ``position``), snapshots to ``snapshots``,
tracking records to ``positions`` (one row per upstream application, the
highest notification id processed).

eventsourcing's recorders are synchronous, so this module runs a synchronous
SQLAlchemy engine on the same URL with the synchronous driver (psycopg for
PostgreSQL, from the ``eventsourcing[postgres]`` extra; sqlite3 for SQLite),
with the same locking as the async store: ``LOCK TABLE events IN EXCLUSIVE
MODE`` per inserting transaction on PostgreSQL (notification ids in commit
order) and ``BEGIN IMMEDIATE`` on SQLite. eventsourcing's
``POSTGRES_ENABLE_DB_FUNCTIONS`` is not used and must not be enabled.

Settings (eventsourcing ``Environment``, so each may be prefixed with the
application's name, e.g. ``BANKACCOUNTS_CONVEYOR_DATABASE_URL``):
``CONVEYOR_DATABASE_URL`` (default ``sqlite+aiosqlite:///conveyor.db``),
``CREATE_TABLE`` (default true: apply Conveyor's migrations on start; false:
only check they are applied), ``ORIGINATOR_ID_TYPE`` (``uuid`` or ``text``),
``CONVEYOR_LOCK_TIMEOUT`` (seconds, default 30).

One notification log per database: applications sharing a database share
``events``, so give each application of a system its own database URL.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal
from uuid import UUID

import sqlalchemy as sa
from eventsourcing import persistence as es
from eventsourcing.utils import Environment, EnvType, resolve_topic, strtobool
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite

from event_store import database, migrate, models

_ERRORS: tuple[tuple[type[exc.DBAPIError], type[es.PersistenceError]], ...] = (
    (exc.IntegrityError, es.IntegrityError),
    (exc.DataError, es.DataError),
    (exc.OperationalError, es.OperationalError),
    (exc.InterfaceError, es.InterfaceError),
    (exc.ProgrammingError, es.ProgrammingError),
    (exc.InternalError, es.InternalError),
    (exc.NotSupportedError, es.NotSupportedError),
)
_CHUNK = 1000


@contextlib.contextmanager
def _es_errors() -> Iterator[None]:
    """Translate SQLAlchemy errors into eventsourcing's persistence errors."""
    try:
        yield
    except exc.DBAPIError as error:
        for sa_type, es_type in _ERRORS:
            if isinstance(error, sa_type):
                raise es_type(str(error.orig)) from error
        raise es.DatabaseError(str(error.orig)) from error
    except exc.SQLAlchemyError as error:
        raise es.OperationalError(str(error)) from error


class Datastore:
    """A synchronous engine on a Conveyor database, for eventsourcing's recorders.

    Args:
        url: the database URL (async or sync driver names are both accepted).
        create_table: apply Conveyor's migrations now; otherwise check they are.
        originator_id_type: ``uuid`` (ids read back as UUIDs) or ``text``.
        lock_timeout: PostgreSQL: seconds to wait for the events table lock.
        pool_size: connections kept open.

    Raises:
        ConfigurationError: unsupported URL, or (``create_table`` false) the
            database is not migrated.
    """

    def __init__(
        self,
        url: str,
        *,
        create_table: bool = True,
        originator_id_type: Literal["uuid", "text"] = "uuid",
        lock_timeout: float = 30.0,
        pool_size: int = 10,
    ) -> None:
        sync_url = database.normalize_url(url, sync=True)
        kwargs: dict[str, Any] = {}
        if not database.is_memory_sqlite(sync_url):
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
        self.engine = sa.create_engine(sync_url, **kwargs)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        if not self.is_postgres:
            database.configure_sqlite(self.engine, 30.0)
        self.reader = self.engine.execution_options(**{database.READONLY: True})
        self.originator_id_type = originator_id_type
        self.lock_timeout = lock_timeout
        try:
            with _es_errors(), self.engine.connect() as connection:
                if create_table:
                    migrate.upgrade_connection(connection)
                    connection.commit()
                else:
                    migrate.check_revision(migrate.current_revision_of(connection), sync_url.render_as_string())
        except BaseException:
            self.engine.dispose()
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A writing transaction, committed on success."""
        with _es_errors(), self.engine.begin() as connection:
            yield connection

    @contextlib.contextmanager
    def reading(self) -> Iterator[sa.Connection]:
        """A read-only transaction."""
        with _es_errors(), self.reader.connect() as connection:
            yield connection

    def lock_events(self, connection: sa.Connection) -> None:
        """Serialise inserts into ``events`` so notification ids follow commit order (PostgreSQL)."""
        if self.is_postgres:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(self.lock_timeout * 1000)}ms'")
            connection.exec_driver_sql("LOCK TABLE events IN EXCLUSIVE MODE")

    def to_originator_id(self, value: str) -> UUID | str:
        """An originator id as eventsourcing expects it back."""
        return UUID(value) if self.originator_id_type == "uuid" else value

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


class SqlAggregateRecorder(es.AggregateRecorder):
    """Stored events of aggregates, in ``events`` (or ``snapshots`` for snapshots)."""

    def __init__(self, datastore: Datastore, table: sa.Table = models.events) -> None:
        self.datastore = datastore
        self.table = table

    def insert_events(self, stored_events: Sequence[es.StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Insert stored events atomically.

        Raises:
            eventsourcing.persistence.IntegrityError: a (originator id, version) exists.
        """
        with self.datastore.transaction() as connection:
            self._insert(connection, stored_events)
        return None

    def _insert(self, connection: sa.Connection, stored_events: Sequence[es.StoredEvent]) -> list[int]:
        if not stored_events:
            return []
        rows = [
            {"stream_id": str(e.originator_id), "version": e.originator_version, "type": e.topic, "data": e.state}
            for e in stored_events
        ]
        if self.table is not models.events:
            connection.execute(sa.insert(self.table), rows)
            return []
        self.datastore.lock_events(connection)
        positions: list[int] = []
        for start in range(0, len(rows), _CHUNK):
            statement = sa.insert(self.table).values(rows[start : start + _CHUNK]).returning(self.table.c.position)
            positions.extend(sorted(connection.execute(statement).scalars()))
        return positions

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[es.StoredEvent]:
        """Stored events of one aggregate, by version."""
        c = self.table.c
        query = sa.select(c.stream_id, c.version, c.type, c.data).where(c.stream_id == str(originator_id))
        if gt is not None:
            query = query.where(c.version > gt)
        if lte is not None:
            query = query.where(c.version <= lte)
        query = query.order_by(c.version.desc() if desc else c.version).limit(limit)
        with self.datastore.reading() as connection:
            rows = connection.execute(query).all()
        to_id = self.datastore.to_originator_id
        return [es.StoredEvent(to_id(r.stream_id), r.version, r.type, r.data) for r in rows]


class SqlApplicationRecorder(SqlAggregateRecorder, es.ApplicationRecorder):
    """Aggregate events plus the application's notification log (global positions)."""

    def insert_events(self, stored_events: Sequence[es.StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Insert stored events atomically; return their notification ids.

        Raises:
            eventsourcing.persistence.IntegrityError: a (originator id, version) exists.
        """
        with self.datastore.transaction() as connection:
            return self._insert(connection, stored_events)

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[es.Notification]:
        """Notifications in position order, from ``start`` up to ``stop``."""
        c = self.table.c
        query = sa.select(c.position, c.stream_id, c.version, c.type, c.data)
        if start is not None:
            query = query.where(c.position >= start if inclusive_of_start else c.position > start)
        if stop is not None:
            query = query.where(c.position <= stop)
        if topics:
            query = query.where(c.type.in_(list(topics)))
        query = query.order_by(c.position).limit(limit)
        with self.datastore.reading() as connection:
            rows = connection.execute(query).all()
        to_id = self.datastore.to_originator_id
        return [
            es.Notification(
                id=r.position,
                originator_id=to_id(r.stream_id),
                originator_version=r.version,
                topic=r.type,
                state=r.data,
            )
            for r in rows
        ]

    def max_notification_id(self) -> int | None:
        """The highest notification id, or None when there are none."""
        with self.datastore.reading() as connection:
            value = connection.execute(sa.select(sa.func.max(self.table.c.position))).scalar()
        return None if value is None else int(value)

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> es.Subscription[es.ApplicationRecorder]:
        """Notifications after ``gt``, then new ones as they commit (polled every 100 ms)."""
        return PollingSubscription(self, gt=gt, topics=topics)


class PollingSubscription(es.ListenNotifySubscription[SqlApplicationRecorder]):
    """An eventsourcing subscription that looks for new notifications every ``interval`` seconds."""

    def __init__(
        self, recorder: SqlApplicationRecorder, gt: int | None = None, topics: Sequence[str] = (), interval: float = 0.1
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._interval = interval
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stopped.wait(self._interval):
            self._has_been_notified.set()

    def stop(self) -> None:
        """Stop the subscription and its poller."""
        self._stopped.set()
        super().stop()

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            self._ticker.join()


class SqlTrackingRecorder(es.TrackingRecorder):
    """Tracking records in ``positions``: the highest notification id processed per upstream application."""

    def __init__(self, datastore: Datastore, **_: Any) -> None:
        self.datastore = datastore

    def insert_tracking(self, tracking: es.Tracking) -> None:
        """Record a tracking object.

        Raises:
            eventsourcing.persistence.IntegrityError: an equal or higher
                notification id was already recorded for the application.
        """
        with self.datastore.transaction() as connection:
            self._insert_tracking(connection, tracking)

    def _insert_tracking(self, connection: sa.Connection, tracking: es.Tracking) -> None:
        table = models.positions
        insert = postgresql.insert if self.datastore.is_postgres else sqlite.insert
        statement = insert(table).values(name=tracking.application_name, position=tracking.notification_id)
        statement = statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"position": statement.excluded.position, "updated_at": models.utcnow()},
            where=table.c.position < statement.excluded.position,
        )
        # RETURNING rather than rowcount: psycopg reports no rowcount for an upsert.
        if connection.execute(statement.returning(table.c.position)).first() is None:
            raise es.IntegrityError(
                f"tracking {tracking.application_name} {tracking.notification_id} is not above the recorded position"
            )

    def max_tracking_id(self, application_name: str) -> int | None:
        """The highest notification id recorded for an upstream application, or None."""
        table = models.positions
        with self.datastore.reading() as connection:
            value = connection.execute(sa.select(table.c.position).where(table.c.name == application_name)).scalar()
        return None if value is None else int(value)


class SqlProcessRecorder(SqlTrackingRecorder, SqlApplicationRecorder, es.ProcessRecorder):
    """Application recorder whose inserts can carry a tracking record, in one transaction."""

    def __init__(self, datastore: Datastore, **_: Any) -> None:
        SqlTrackingRecorder.__init__(self, datastore)
        SqlApplicationRecorder.__init__(self, datastore)

    def insert_events(self, stored_events: Sequence[es.StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Insert stored events and the optional ``tracking`` record atomically.

        Raises:
            eventsourcing.persistence.IntegrityError: an event exists, or the
                tracking record is not above the recorded position.
        """
        tracking: es.Tracking | None = kwargs.get("tracking")
        with self.datastore.transaction() as connection:
            if tracking is not None:
                self._insert_tracking(connection, tracking)
            return self._insert(connection, stored_events)


class Factory(es.InfrastructureFactory[SqlTrackingRecorder]):
    """eventsourcing infrastructure factory for Conveyor's database (see the module docstring)."""

    DATABASE_URL = "CONVEYOR_DATABASE_URL"
    CREATE_TABLE = "CREATE_TABLE"
    ORIGINATOR_ID_TYPE = "ORIGINATOR_ID_TYPE"
    LOCK_TIMEOUT = "CONVEYOR_LOCK_TIMEOUT"

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        id_type = (self.env.get(self.ORIGINATOR_ID_TYPE) or "uuid").lower()
        if id_type not in ("uuid", "text"):
            raise es.InfrastructureFactoryError(f"{self.ORIGINATOR_ID_TYPE} must be uuid or text, got {id_type!r}")
        self.datastore = Datastore(
            self.env.get(self.DATABASE_URL) or database.DEFAULT_URL,
            create_table=strtobool(self.env.get(self.CREATE_TABLE) or "yes"),
            originator_id_type="uuid" if id_type == "uuid" else "text",
            lock_timeout=float(self.env.get(self.LOCK_TIMEOUT) or 30.0),
        )

    def aggregate_recorder(self, purpose: str = "events") -> es.AggregateRecorder:
        """Recorder of aggregate events (``purpose="events"``) or snapshots (``"snapshots"``)."""
        return SqlAggregateRecorder(self.datastore, models.snapshots if purpose == "snapshots" else models.events)

    def application_recorder(self) -> es.ApplicationRecorder:
        """The application recorder (``APPLICATION_RECORDER_TOPIC`` may name a subclass)."""
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        cls: type[SqlApplicationRecorder] = resolve_topic(topic) if topic else SqlApplicationRecorder
        return cls(self.datastore)

    def tracking_recorder(
        self, tracking_recorder_class: type[SqlTrackingRecorder] | None = None
    ) -> SqlTrackingRecorder:
        """A tracking recorder (``TRACKING_RECORDER_TOPIC`` may name a subclass)."""
        if tracking_recorder_class is None:
            topic = self.env.get(self.TRACKING_RECORDER_TOPIC)
            tracking_recorder_class = resolve_topic(topic) if topic else SqlTrackingRecorder
        assert tracking_recorder_class is not None
        return tracking_recorder_class(self.datastore)

    def process_recorder(self) -> es.ProcessRecorder:
        """The process recorder (``PROCESS_RECORDER_TOPIC`` may name a subclass)."""
        topic = self.env.get(self.PROCESS_RECORDER_TOPIC)
        cls: type[SqlProcessRecorder] = resolve_topic(topic) if topic else SqlProcessRecorder
        return cls(self.datastore)

    def close(self) -> None:
        """Close the database connections."""
        self.datastore.close()
