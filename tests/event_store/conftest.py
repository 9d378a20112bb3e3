"""Database fixtures for the event_store tests: SQLite and PostgreSQL, a fresh database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import es_dbs
import pytest

from event_store import Database


@pytest.fixture(scope="session", autouse=True)
def _drop_templates() -> Iterator[None]:
    yield
    es_dbs.drop_templates()


@pytest.fixture(params=["sqlite", "postgres"])
def db_kind(request: pytest.FixtureRequest) -> str:
    """Each test runs on SQLite and on PostgreSQL."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_url")  # skips (or fails in CI) when the server is down
    return str(request.param)


@pytest.fixture
def postgres_only(db_kind: str) -> None:
    """Skip the SQLite variant of a test about PostgreSQL behaviour."""
    if db_kind != "postgres":
        pytest.skip("PostgreSQL only (one relay per SQLite file)")


@pytest.fixture
def db_url(db_kind: str) -> Iterator[str]:
    """A fresh, migrated database; dropped after the test, which fails if a connection leaked."""
    url = es_dbs.create(db_kind)
    yield url
    leaked = es_dbs.open_connections(url)
    es_dbs.drop(url)
    assert leaked == 0, f"{leaked} connection(s) to the test database were left open"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """A :class:`Database` on the fresh database; every connection is returned and closed after."""
    database = Database(db_url)
    yield database
    checked_out = database.engine.pool.checkedout()
    await database.close()
    assert checked_out == 0, f"{checked_out} pooled connection(s) were not returned"
