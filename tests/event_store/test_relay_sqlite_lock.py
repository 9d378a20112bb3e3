"""One relay per SQLite file: a second relay stands by and takes over when the first stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import databases
import pytest
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import wait_for
from relay_helpers import Broker, Flaky, Relays, add, connected, unsent, wait_until

from event_store import Database, SqlOutboxStore

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
    relays.start(Relay(SqlOutboxStore(second_db), await connected(_counting(broker)), options=FAST))
    await wait_for(lambda: "standing by" in caplog.text, 10, "the standby message")
    await asyncio.sleep(0.5)  # the measurement window: about ten more lock attempts
    assert caplog.text.count("standing by") == 1
