"""Worker heartbeats: a process's row is replaced by its beats, aged on the database clock, deleted as it leaves."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from conveyor import errors, heartbeats
from conveyor.runtime import app, heartbeat
from relay_helpers import wait_until

from event_store import Database, models
from event_store.heartbeats import SqlHeartbeatStore


def beat(id: str = "host-a:10:x", in_flight: int = 0) -> heartbeats.Heartbeat:  # noqa: A002
    return heartbeats.Heartbeat(
        id=id, service="shop", host="host-a", pid=10, roles=("worker", "relay"), handlers=("billing.charge",),
        in_flight=in_flight, started_at=datetime(2026, 12, 7, 18, 0, tzinfo=UTC),
    )  # fmt: skip


async def age(db: Database, id: str, by: timedelta) -> None:  # noqa: A002
    table = models.worker_heartbeats
    async with db.transaction() as session:
        row = (await session.execute(sa.select(table.c.beat_at).where(table.c.id == id))).scalar_one()
        await session.execute(sa.update(table).where(table.c.id == id).values(beat_at=row - by))


async def test_heartbeat_beats_replace_the_process_row(db: Database) -> None:
    store = SqlHeartbeatStore(db)
    await store.beat(beat(in_flight=1))
    await store.beat(beat(in_flight=7))
    seen = await store.seen()
    assert [(s.heartbeat, s.gone) for s in seen] == [(beat(in_flight=7), False)]
    assert seen[0].age < timedelta(seconds=5)


async def test_heartbeat_silent_for_three_beats_is_gone_and_purged_later(db: Database) -> None:
    store = SqlHeartbeatStore(db)
    for id in ("live", "silent", "long-dead"):  # noqa: A001
        await store.beat(beat(id))
    await age(db, "silent", heartbeats.EVERY * (heartbeats.GONE_AFTER_BEATS + 1))
    await age(db, "long-dead", heartbeats.EVERY * (heartbeats.PURGE_AFTER_BEATS + 1))
    gone = {s.heartbeat.id: s.gone for s in await store.seen()}
    purged = await store.purge(heartbeats.EVERY * heartbeats.PURGE_AFTER_BEATS)
    assert (gone, purged) == ({"live": False, "silent": True, "long-dead": True}, 1)
    assert [s.heartbeat.id for s in await store.seen()] == ["live", "silent"]


async def test_heartbeat_leave_deletes_only_its_row(db: Database) -> None:
    store = SqlHeartbeatStore(db)
    await store.beat(beat("one"))
    await store.beat(beat("two"))
    await store.leave("one")
    await store.leave("never-was")
    assert [s.heartbeat.id for s in await store.seen()] == ["two"]


async def test_heartbeat_process_beats_until_stopped_then_leaves(db: Database) -> None:
    store = app.stores_for(db, "shop").heartbeats
    in_flight = iter(range(100))
    beater = heartbeat.Beater(store, lambda: beat("me", next(in_flight)), every=timedelta(seconds=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(beater.run(stop))

    async def beaten_twice() -> bool:
        seen = await store.seen()
        return bool(seen) and seen[0].heartbeat.in_flight >= 2

    try:
        await wait_until(beaten_twice, 10, "two beats")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert await store.seen() == []


class Failing:
    """A store whose database is down for the first ``outage`` beats."""

    def __init__(self, outage: int) -> None:
        self.outage = outage
        self.beats: list[heartbeats.Heartbeat] = []

    async def beat(self, heartbeat: heartbeats.Heartbeat) -> None:
        if self.outage:
            self.outage -= 1
            raise errors.StoreUnavailable("database down")
        self.beats.append(heartbeat)

    async def purge(self, older_than: timedelta) -> int:
        return 0

    async def leave(self, id: str) -> None:  # noqa: A002
        raise errors.StoreUnavailable("database down")

    async def seen(self) -> list[heartbeats.Seen]:
        return []


async def test_heartbeat_outage_is_waited_out_and_beating_resumes() -> None:
    store = Failing(outage=3)
    stop = asyncio.Event()
    beater = heartbeat.Beater(store, lambda: beat("me"), every=timedelta(seconds=0.01))
    task = asyncio.create_task(beater.run(stop))

    async def beaten() -> bool:
        return bool(store.beats)

    try:
        await wait_until(beaten, 10, "a beat after the outage")
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 10)
    assert task.done() and task.exception() is None


async def test_heartbeat_bug_in_the_snapshot_is_not_swallowed(db: Database) -> None:
    def broken() -> heartbeats.Heartbeat:
        raise ZeroDivisionError

    beater = heartbeat.Beater(SqlHeartbeatStore(db), broken, every=timedelta(seconds=0.01))
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(beater.run(asyncio.Event()), 10)
