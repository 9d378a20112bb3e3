"""The tables of Conveyor's persistence package, as SQLAlchemy Core metadata.

The Alembic migrations in :mod:`event_store.migrations` create exactly these
tables (a test compares them); code reads and writes them through the Core
``Table`` objects below.

Times are stored by the database clock (``utcnow()`` server defaults), so hosts
with skewed clocks agree. On SQLite the database clock is the host clock, and
times are stored as ``YYYY-MM-DD HH:MM:SS.ffffff`` UTC text, the format
SQLAlchemy reads back.

Tables that rows are deleted from (outbox, inbox-like purges, events never)
use SQLite ``AUTOINCREMENT`` so ids are never reused: without it SQLite hands
out ``max(id) + 1`` again after the highest rows are deleted, and a reader
that remembers the last id it saw would skip the new rows.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# An integer primary key that is a rowid alias (and so AUTOINCREMENT-able) on
# SQLite and a 64-bit identity elsewhere.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class utcnow(FunctionElement[Any]):
    """The database clock's current UTC time, as a column default or in queries.

    PostgreSQL: ``now()`` (the transaction's start time). SQLite: the current
    time as text in the format SQLAlchemy stores datetimes in, so comparisons
    with stored values are plain string comparisons.
    """

    type = sa.DateTime(timezone=True)
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_postgresql(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f000', 'now'))"


@compiles(utcnow)
def _utcnow_default(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


def _now_default() -> sa.DefaultClause:
    return sa.DefaultClause(utcnow())


def _time(name: str, *, nullable: bool = False, default: bool = True) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=_now_default() if default else None,
    )


events = sa.Table(
    "events",
    metadata,
    sa.Column("position", BigId, primary_key=True, autoincrement=True),
    sa.Column("stream_id", sa.String(255), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=True),
    _time("recorded_at"),
    sa.UniqueConstraint("stream_id", "version"),
    sa.Index("ix_events_type_position", "type", "position"),
    sqlite_autoincrement=True,
)
"""The event log of every stream; ``position`` is global and increases in commit order."""

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("stream_id", sa.String(255), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=True),
    _time("recorded_at"),
)
"""Snapshots of streams at a version; the newest one per stream is used."""

OUTBOX_RETRYING = "sent_at IS NULL AND (attempts > 0 OR parked_at IS NOT NULL)"
"""Predicate of the partial index of unsent rows that failed: the few rows that can make a key wait."""

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(200), nullable=False, unique=True),
    sa.Column("topic", sa.String(255), nullable=False),
    sa.Column("partition_key", sa.String(255), nullable=True),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    _time("created_at"),
    _time("available_at"),
    _time("sent_at", nullable=True, default=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    _time("parked_at", nullable=True, default=False),
    sa.Index(
        "ix_outbox_unsent",
        "id",
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    ),
    sa.Index(
        "ix_outbox_retrying",
        "partition_key",
        "id",
        postgresql_where=sa.text(OUTBOX_RETRYING),
        sqlite_where=sa.text(OUTBOX_RETRYING),
    ),
    sa.Index("ix_outbox_sent_at", "sent_at"),
    sqlite_autoincrement=True,
)
"""Messages waiting for the relay: binary-mode CloudEvents (``ce-*`` headers, data as body).

``attempts`` counts publishes the broker refused (an outage counts none);
``parked_at`` is set when the last allowed attempt failed: the row waits for an
operator, and so do the later rows of its key.
"""

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("handler", sa.String(128), primary_key=True),
    sa.Column("message_id", sa.String(200), primary_key=True),
    _time("processed_at"),
    sa.Index("ix_inbox_processed_at", "processed_at"),
)
"""Messages a handler has processed: one row per (handler, message id)."""

positions = sa.Table(
    "positions",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    _time("updated_at"),
)
"""How far each projection or consumer (and each eventsourcing follower) has read the event log."""

schedule_claims = sa.Table(
    "schedule_claims",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("schedule", sa.String(128), nullable=False),
    sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(32), nullable=False, server_default="claimed"),
    sa.Column("claimed_by", sa.String(255), nullable=True),
    _time("claimed_at"),
    _time("started_at", nullable=True, default=False),
    _time("finished_at", nullable=True, default=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("owner", sa.String(255), nullable=True),
    _time("lease_until", nullable=True, default=False),
    sa.UniqueConstraint("schedule", "fire_time"),
    sqlite_autoincrement=True,
)
"""One row per fire of a schedule: the unique (schedule, UTC fire time) makes a fire happen once.

``owner`` is the job attempt that started the run, ``lease_until`` (database
time) how long it holds it: no other delivery runs the job before then.
"""

schedule_states = sa.Table(
    "schedule_states",
    metadata,
    sa.Column("schedule", sa.String(128), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    _time("resumed_at", nullable=True, default=False),
    _time("updated_at"),
)
"""Pause state per schedule, read by every scheduler replica; fires between pause and resume are not run."""

sagas = sa.Table(
    "sagas",
    metadata,
    sa.Column("saga", sa.String(128), primary_key=True),
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("waiting", sa.String(32), nullable=True),
    sa.Column("sent", sa.Integer, nullable=False),
    sa.Column("undo_attempts", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("cause", sa.Text, nullable=True),
    sa.Column("timer_id", sa.String(200), nullable=True),
    sa.Column("state", sa.JSON, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    _time("deadline", nullable=True, default=False),
    _time("created_at"),
    _time("updated_at"),
    sa.Index("ix_sagas_status_updated_at", "status", "updated_at"),
    sa.Index("ix_sagas_saga_status", "saga", "status"),
)
"""Saga instances: state, position, the token awaited, and a version for optimistic concurrency."""

saga_log = sa.Table(
    "saga_log",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("saga", sa.String(128), nullable=False),
    sa.Column("instance_id", sa.String(200), nullable=False),
    sa.Column("step", sa.String(128), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("token", sa.String(32), nullable=True),
    _time("at"),
    sa.Index("ix_saga_log_saga_instance_id_id", "saga", "instance_id", "id"),
    sqlite_autoincrement=True,
)
"""Each instance's step log: commands sent, replies, timeouts, undos, in order."""

held_dead_letters = sa.Table(
    "held_dead_letters",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("topic", sa.String(255), nullable=False),
    sa.Column("message_id", sa.String(200), nullable=True),
    sa.Column("partition_key", sa.String(255), nullable=True),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    _time("held_at"),
    sa.Index("ix_held_dead_letters_topic_id", "topic", "id"),
    sqlite_autoincrement=True,
)
"""Dead letters the broker refused for good, kept here instead (``conveyor dlq`` shows them too)."""

worker_heartbeats = sa.Table(
    "worker_heartbeats",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("service", sa.String(128), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("roles", sa.JSON, nullable=False),
    sa.Column("handlers", sa.JSON, nullable=False),
    sa.Column("in_flight", sa.Integer, nullable=False),
    _time("started_at", default=False),
    _time("beat_at"),
)
"""Each live process's latest heartbeat (:mod:`conveyor.heartbeats`), renewed every few seconds."""

OUTBOX_CHANNEL = "conveyor_outbox"
"""PostgreSQL NOTIFY channel a trigger signals on every insert into the outbox."""
