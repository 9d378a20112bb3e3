"""The connection pool is sized from the process's handler concurrency, and configurable in the database URL."""

from __future__ import annotations

import pytest
from conveyor import ConfigurationError

from event_store import Database, database


def test_pool_size_for_concurrency_covers_handlers_relay_and_scheduler() -> None:
    assert database.pool_size_for(16) == 16 + database.BACKGROUND_CONNECTIONS


async def test_database_pool_is_at_least_the_handler_concurrency_plus_background(tmp_path: object) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/pool.db", concurrency=32)
    try:
        assert db.engine.pool.size() == 32 + database.BACKGROUND_CONNECTIONS  # type: ignore[attr-defined]
    finally:
        await db.close()


async def test_database_url_pool_size_option_sets_the_pool_and_is_not_passed_to_the_driver(
    postgres_url: str,
) -> None:
    db = Database(f"{postgres_url}?pool_size=40")
    try:
        assert db.engine.pool.size() == 40  # type: ignore[attr-defined]
        await db.check()  # asyncpg would refuse an unknown pool_size connection argument
    finally:
        await db.close()


def test_database_url_pool_size_below_the_concurrency_is_the_operators_cap_and_is_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database("postgresql+asyncpg://u@h/db?pool_size=4", concurrency=16)
    assert db.pool_size == 4
    assert "pool_size=4 is below the 20 connections" in caplog.text


def test_database_url_pool_size_not_a_number_fails_naming_the_option() -> None:
    with pytest.raises(ConfigurationError, match="pool_size"):
        Database("postgresql+asyncpg://u@h/db?pool_size=many")
