"""The event store: optimistic concurrency, commit-ordered global log, snapshots, projections."""

from __future__ import annotations

import asyncio
import random

import pytest
import sqlalchemy as sa
from conveyor import errors, stores
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import Database, ProjectionRunner, Snapshot, SqlEventStore


def _events(*types: str) -> list[stores.NewEvent]:
    return [stores.NewEvent(type=t, data=b'{"n": 1}', metadata={"by": "test"}) for t in types]


async def test_append_new_stream_returns_version_and_reads_back(db: Database) -> None:
    store = SqlEventStore(db)
    version = await store.append("order-1", _events("placed", "paid"), expected_version=0)
    events = await store.read_stream("order-1")
    assert version == 2
    assert [(e.version, e.type, e.metadata) for e in events] == [
        (1, "placed", {"by": "test"}),
        (2, "paid", {"by": "test"}),
    ]


async def test_append_stale_expected_version_raises_conflict(db: Database) -> None:
    store = SqlEventStore(db)
    await store.append("order-1", _events("placed"), expected_version=0)
    with pytest.raises(errors.ConcurrencyConflict):
        await store.append("order-1", _events("paid"), expected_version=0)


async def test_append_two_concurrent_writers_same_version_one_conflicts(db: Database) -> None:
    store = SqlEventStore(db)
    await store.append("order-1", _events("placed"), expected_version=0)
    both_read = asyncio.Barrier(2)

    async def writer(name: str) -> str:
        seen = len(await store.read_stream("order-1"))
        await both_read.wait()  # both decided on version 1 before either appends
        await store.append("order-1", _events(name), expected_version=seen)
        return name

    results = await asyncio.gather(writer("a"), writer("b"), return_exceptions=True)
    conflicts = [r for r in results if isinstance(r, errors.ConcurrencyConflict)]
    assert len(conflicts) == 1, results
    assert len(await store.read_stream("order-1")) == 2


async def test_read_all_tailing_reader_with_8_writers_sees_every_event_once(db: Database) -> None:
    store = SqlEventStore(db)
    writers, appends = 8, 25
    done = asyncio.Event()

    async def writer(index: int) -> None:
        for n in range(appends):
            async with db.transaction() as session:
                await store.append(f"s{index}", _events("a", "b"), expected_version=2 * n, tx=session)
                # Commit late, while other writers have taken later positions (if they could).
                await asyncio.sleep(random.uniform(0, 0.004))

    async def reader() -> list[int]:
        seen: list[int] = []
        last = 0
        while True:
            finished = done.is_set()
            batch = await store.read_all(after=last, limit=37)
            seen.extend(e.position for e in batch)
            if batch:
                last = batch[-1].position
            elif finished:
                return seen
            await asyncio.sleep(0)

    tail = asyncio.create_task(reader())
    await asyncio.gather(*(writer(i) for i in range(writers)))
    done.set()
    seen = await asyncio.wait_for(tail, 30)
    everything = [e.position for e in await store.read_all(limit=10_000)]
    assert len(everything) == writers * appends * 2
    assert seen == everything  # nothing skipped, nothing twice, in position order


async def test_read_stream_after_version_returns_later_events(db: Database) -> None:
    store = SqlEventStore(db)
    await store.append("s", _events("a", "b", "c"), expected_version=0)
    assert [e.type for e in await store.read_stream("s", after_version=1)] == ["b", "c"]


async def test_snapshot_newest_one_is_loaded(db: Database) -> None:
    store = SqlEventStore(db)
    await store.save_snapshot(Snapshot("s", 3, "state", b"three", {}))
    await store.save_snapshot(Snapshot("s", 7, "state", b"seven", {"v": 1}))
    await store.save_snapshot(Snapshot("s", 7, "state", b"again", {}))  # same version: ignored
    snapshot = await store.load_snapshot("s")
    assert snapshot is not None
    assert (snapshot.version, snapshot.data, snapshot.metadata) == (7, b"seven", {"v": 1})


class _Counting:
    """A projection counting events per type into a table, failing on demand."""

    name = "test.counts"

    def __init__(self) -> None:
        self.fail_on: str | None = None

    async def apply(self, session: AsyncSession, event: stores.RecordedEvent) -> None:
        if event.type == self.fail_on:
            raise RuntimeError("projection bug")
        await session.execute(sa.text("INSERT INTO counts (type) VALUES (:t)"), {"t": event.type})


async def _count_rows(db: Database) -> int:
    async with db.transaction(readonly=True) as session:
        return int((await session.execute(sa.text("SELECT count(*) FROM counts"))).scalar_one())


async def test_projection_failure_rolls_back_writes_and_position_together(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE counts (type VARCHAR(50))"))
    store = SqlEventStore(db)
    await store.append("s", _events("a", "b", "boom", "c"), expected_version=0)
    projection = _Counting()
    runner = ProjectionRunner(db, projection, batch_size=10)
    projection.fail_on = "boom"
    with pytest.raises(RuntimeError):
        await runner.run_once()
    assert (await runner.position(), await _count_rows(db)) == (0, 0)
    projection.fail_on = None
    assert await runner.run_once() == 4
    assert await runner.run_once() == 0
    assert (await runner.position(), await _count_rows(db)) == (4, 4)


async def test_transaction_callers_own_connection_error_is_not_taken_for_a_database_outage(db: Database) -> None:
    with pytest.raises(ConnectionError, match="the payment gateway"):
        async with db.transaction():
            raise ConnectionError("the payment gateway hung up")


async def test_transaction_database_error_inside_the_block_is_translated(db: Database) -> None:
    with pytest.raises(errors.StoreError):
        async with db.transaction() as session:
            await session.execute(sa.text("SELECT * FROM no_such_table"))


async def test_append_leaves_the_transactions_lock_timeout_as_it_was(pg_db: Database) -> None:
    store = SqlEventStore(pg_db)
    async with pg_db.transaction() as session:
        await session.execute(sa.text("SET LOCAL lock_timeout = '1234ms'"))
        await store.append("s-1", [stores.NewEvent("e", b"{}")], expected_version=0, tx=session)
        await store.append("s-2", [stores.NewEvent("e", b"{}")], expected_version=0, tx=session)
        after = (await session.execute(sa.text("SHOW lock_timeout"))).scalar_one()
    assert after == "1234ms"
