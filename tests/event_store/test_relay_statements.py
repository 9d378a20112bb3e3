"""Under a backlog the relay runs at most one SQL statement per ten messages (counted with a cursor listener)."""

from __future__ import annotations

from conveyor.runtime.relay import Relay
from relay_helpers import Broker, add, unsent
from sqlalchemy import event

from event_store import Database, SqlOutboxStore


async def test_relay_backlog_costs_at_most_one_statement_per_ten_messages(db: Database, broker: Broker) -> None:
    for start in range(0, 1000, 250):
        await add(db, 250, start=start, key=None if start % 500 else f"k{start}")
    seen: list[str] = []
    event.listen(db.engine.sync_engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    store = SqlOutboxStore(db, listen=False)
    relay = Relay(store, broker.transport)
    try:
        published = 0
        while published < 1000:
            published += (await relay.run_once()).published
    finally:
        await store.close()
    assert await unsent(db) == 0
    assert len(seen) <= 1000 // 10, seen[:5]
