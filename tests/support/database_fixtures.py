"""Database fixtures for every test folder: SQLite and PostgreSQL, a fresh database per test.

Registered from ``tests/conftest.py`` as a pytest plugin. ``db_kind``,
``db_url`` and ``db`` run a test on both databases; ``pg_db_url`` and
``pg_db`` run it on PostgreSQL only, for behaviour SQLite does not have
(LISTEN/NOTIFY, several relays on one database).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import databases
import pytest

from event_store import Database


@pytest.fixture(scope="session", autouse=True)
def _drop_templates() -> Iterator[None]:
    yield
    databases.drop_templates()


@pytest.fixture(params=["sqlite", "postgres"])
def db_kind(request: pytest.FixtureRequest) -> str:
    """Each test runs on SQLite and on PostgreSQL."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_url")  # skips (or fails in CI) when the server is down
    return str(request.param)


@pytest.fixture
def db_url(db_kind: str) -> Iterator[str]:
    """A fresh, migrated database; dropped after the test, which fails if a connection leaked."""
    yield from _fresh_database(db_kind)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """A :class:`Database` on the fresh database; every connection is returned and closed after."""
    async with _opened(db_url) as database:
        yield database


@pytest.fixture(params=["postgres"])
def pg_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, for a test of PostgreSQL-only behaviour (like ``db_url``)."""
    yield from _fresh_database("postgres")


@pytest.fixture
async def pg_db(pg_db_url: str) -> AsyncIterator[Database]:
    """A :class:`Database` on a fresh PostgreSQL database (like ``db``)."""
    async with _opened(pg_db_url) as database:
        yield database


def _fresh_database(kind: str) -> Iterator[str]:
    url = databases.create(kind)
    yield url
    leaked = databases.open_connections(url)
    databases.drop(url)
    assert leaked == 0, f"{leaked} connection(s) to the test database were left open"


@contextlib.asynccontextmanager
async def _opened(url: str) -> AsyncIterator[Database]:
    database = Database(url)
    yield database
    checked_out = database.engine.pool.checkedout()
    await database.close()
    assert checked_out == 0, f"{checked_out} pooled connection(s) were not returned"
