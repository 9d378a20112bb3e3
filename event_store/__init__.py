"""Conveyor's persistence: events, outbox, inbox, positions, schedule claims and saga state on SQL.

SQLAlchemy 2 (async) on SQLite (aiosqlite; the embedded default) and
PostgreSQL (asyncpg), with Alembic migrations (:func:`upgrade`,
:func:`ensure_current`). Driver errors are translated into
:mod:`conveyor.errors`; nothing here leaks ``sqlalchemy.exc``.
"""

from event_store.database import DEFAULT_URL, Database, StoreUnavailable
from event_store.delayed import schedule_at
from event_store.inbox import Inbox
from event_store.migrate import ensure_current, head_revision, upgrade
from event_store.outbox import Outbox
from event_store.outbox_store import SqlOutboxStore
from event_store.projections import Projection, ProjectionRunner
from event_store.store import Snapshot, SqlEventStore
from event_store.unit_of_work import SqlUnits, sql_persistence

__all__ = [
    "DEFAULT_URL",
    "Database",
    "Inbox",
    "Outbox",
    "Projection",
    "ProjectionRunner",
    "Snapshot",
    "SqlEventStore",
    "SqlOutboxStore",
    "SqlUnits",
    "StoreUnavailable",
    "ensure_current",
    "head_revision",
    "schedule_at",
    "sql_persistence",
    "upgrade",
]
