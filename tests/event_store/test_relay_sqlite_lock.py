"""One relay per SQLite file: a second relay stands by and takes over when the first stops."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import databases
import pytest
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import wait_for
from relay_helpers import Broker, Flaky, Relays, add, connected, unsent, wait_until

from event_store import Database, SqlOutboxStore
from event_store.outbox_store import SqlOutboxBatch

FAST = RelayOptions(poll_interval=0.05)


@pytest.fixture
def sqlite_url() -> Iterator[str]:
    url = databases.create("sqlite")
    yield url
    databases.drop(url)


@pytest.fixture
async def handles(sqlite_url: str) -> AsyncIterator[list[Database]]:
    """Three handles on one SQLite file, as three processes would have: a writer and two relays."""
    opened = [Database(sqlite_url) for _ in range(3)]
    yield opened
    for database in opened:
        await database.close()


def _counting(broker: Broker) -> Flaky:
    return Flaky(broker.url, lambda _: False, RuntimeError)


class _CountingClaims(SqlOutboxStore):
    """Counts claims: each one is a lock attempt while the relay stands by."""

    claims = 0

    def claim(self, limit: int) -> contextlib.AbstractAsyncContextManager[SqlOutboxBatch]:
        self.claims += 1
        return super().claim(limit)


async def _nothing_unsent(db: Database) -> bool:
    return await unsent(db) == 0


async def test_relay_second_relay_on_sqlite_file_publishes_nothing(
    handles: list[Database], broker: Broker, relays: Relays
) -> None:
    writer, first_db, second_db = handles
    first, second = await connected(_counting(broker)), await connected(_counting(broker))
    relays.start(Relay(SqlOutboxStore(first_db), first, options=FAST))
    relays.start(Relay(SqlOutboxStore(second_db), second, options=FAST))
    await add(writer, 50)
    await wait_until(lambda: _nothing_unsent(writer), 10, "every row marked sent")
    assert sorted([first.calls, second.calls]) == [0, 50]


async def test_relay_standby_on_sqlite_file_takes_over_when_first_stops(
    handles: list[Database], broker: Broker, relays: Relays
) -> None:
    writer, first_db, second_db = handles
    first, second = await connected(_counting(broker)), await connected(_counting(broker))
    active = Relay(SqlOutboxStore(first_db), first, options=FAST)
    relays.start(active)
    await add(writer, 1)
    await wait_for(lambda: first.calls == 1, 10, "the first relay's publish")
    relays.start(Relay(SqlOutboxStore(second_db), second, options=FAST))
    await relays.stop(active)
    await add(writer, 5)
    await wait_for(lambda: second.calls == 5, 10, "the standby relay's publishes")


async def test_relay_standby_on_sqlite_file_logs_standing_by_once(
    handles: list[Database], broker: Broker, relays: Relays, caplog: pytest.LogCaptureFixture
) -> None:
    writer, first_db, second_db = handles
    caplog.set_level(logging.INFO)
    first = await connected(_counting(broker))
    relays.start(Relay(SqlOutboxStore(first_db), first, options=FAST))
    await add(writer, 1)
    await wait_for(lambda: first.calls == 1, 10, "the first relay's publish")
    standby = _CountingClaims(second_db)
    relays.start(Relay(standby, await connected(_counting(broker)), options=FAST))
    await wait_for(lambda: "standing by" in caplog.text, 10, "the standby message")
    logged_at = standby.claims
    await wait_for(lambda: standby.claims >= logged_at + 10, 10, "ten more lock attempts of the standby relay")
    assert caplog.text.count("standing by") == 1


def test_every_spelling_of_one_sqlite_file_takes_the_same_relay_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from event_store import relay_lock

    database = tmp_path / "app.db"
    database.touch()
    (tmp_path / "link.db").symlink_to(database)
    monkeypatch.chdir(tmp_path)
    spellings = ["app.db", "./app.db", str(database), f"{tmp_path}/../{tmp_path.name}/app.db", "link.db"]
    assert {relay_lock.lock_path(s) for s in spellings} == {relay_lock.lock_path(str(database))}
