"""The SQL persistence stores (``event_store``) against the persistence conformance suite, on SQLite and PostgreSQL.

Each test gets a fresh migrated database from the ``db`` fixture
(``tests/support/database_fixtures.py``), which closes it afterwards and fails
the test if a connection leaked.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conveyor.persistence import Persistence
from conveyor.testing import PersistenceConformance
from conveyor.testing.persistence_suite import OutboxTopics

from event_store import Database, sql_persistence


class SqlPersistence(PersistenceConformance):
    """The suite's fixtures on a fresh SQL database; subclasses pick the database with ``db_kind``."""

    @pytest.fixture
    def persistence(self, db: Database) -> Persistence:
        return sql_persistence(db, "conformance")

    @pytest.fixture
    def outbox_topics(self, db: Database) -> OutboxTopics:
        async def read() -> list[tuple[str, str]]:
            async with db.transaction(readonly=True) as session:
                rows = (await session.execute(sa.text("SELECT topic, message_id FROM outbox ORDER BY id"))).all()
            return [(str(row.topic), str(row.message_id)) for row in rows]

        return read


class TestSqlite(SqlPersistence):
    @pytest.fixture
    def db_kind(self) -> str:
        return "sqlite"


class TestPostgres(SqlPersistence):
    @pytest.fixture
    def db_kind(self, postgres_url: str) -> str:
        return "postgres"
