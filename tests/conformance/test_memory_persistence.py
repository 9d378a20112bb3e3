"""The in-memory persistence (``conveyor.memory_persistence``) against the persistence conformance suite."""

from __future__ import annotations

import asyncio

import pytest
from conveyor import envelope, errors
from conveyor.memory_persistence import MemoryDatabase, MemoryTx, OutboxRow, memory_persistence
from conveyor.persistence import Persistence
from conveyor.testing import PersistenceConformance
from conveyor.testing.persistence_suite import OutboxTopics


class TestMemoryPersistence(PersistenceConformance):
    @pytest.fixture
    def db(self) -> MemoryDatabase:
        return MemoryDatabase()

    @pytest.fixture
    def persistence(self, db: MemoryDatabase) -> Persistence:
        return memory_persistence("conformance", db=db)

    @pytest.fixture
    def outbox_topics(self, db: MemoryDatabase) -> OutboxTopics:
        async def read() -> list[tuple[str, str]]:
            rows: dict[int, OutboxRow] = db.table("outbox")
            return [(rows[i].message.topic, rows[i].message.message_id) for i in sorted(rows)]

        return read


async def test_memory_savepoint_block_raising_undoes_only_its_writes() -> None:
    db = MemoryDatabase()

    async def failing_step(tx: MemoryTx) -> None:
        async with tx.savepoint():
            await tx.put("ledger", "undone", 2)
            raise KeyError("the step failed")

    async with db.transaction() as tx:
        await tx.put("ledger", "kept", 1)
        with pytest.raises(KeyError):
            await failing_step(tx)
    assert db.table("ledger") == {"kept": 1}


async def test_memory_opposite_lock_order_fails_one_transaction_with_a_conflict() -> None:
    db = MemoryDatabase()
    first, second = db.begin(), db.begin()
    await first.put("ledger", "a", 1)
    await second.put("ledger", "b", 1)
    waiting = asyncio.create_task(first.put("ledger", "b", 2))
    await asyncio.sleep(0)
    with pytest.raises(errors.ConcurrencyConflict):
        await second.put("ledger", "a", 2)
    second.rollback()
    await asyncio.wait_for(waiting, 1.0)
    await first.commit()
    assert db.table("ledger") == {"a": 1, "b": 2}


async def test_memory_relay_claim_waits_for_a_failed_key_and_skips_open_claims() -> None:
    db = MemoryDatabase()
    persistence = memory_persistence("conformance", db=db)
    events = [envelope.create("orders", {"n": n}, source="t", key=key) for n, key in enumerate("aab")]
    async with db.transaction() as tx:
        for event in events:
            await persistence.outbox.add(tx, "orders", event)
    store = persistence.relay_store()
    other = persistence.relay_store()
    async with store.claim(10) as batch:
        assert [m.message_id for m in batch.messages] == [e.id for e in events]
        async with other.claim(10) as concurrent:
            assert concurrent.messages == []
        batch.failed(batch.messages[0], "refused", retry_in=60.0)
        batch.sent(batch.messages[2])
    async with store.claim(10) as batch:
        assert batch.messages == []  # key a waits behind its backing-off first row
    assert (await store.stats()).backlog == 2
