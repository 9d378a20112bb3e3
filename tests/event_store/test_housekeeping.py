"""Retention: old inbox rows and finished schedule runs are purged; recent ones and each schedule's latest stay."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from conveyor.runtime import app, housekeeping
from conveyor.sagas import engine

from event_store import Database, Inbox, claims, models


async def test_purge_deletes_only_what_is_older_than_the_retention(db: Database) -> None:
    async with db.transaction() as session:
        now = await claims.database_now(session)
        for n in range(3):
            await Inbox().claim(session, "h.one", f"m-{n}")
        for days in (30, 20, 0):  # two old finished runs, and the latest
            await claims.claim(session, "s.one", now - timedelta(days=days), status=claims.SUCCEEDED, claimed_by="t")
    async with db.transaction() as session:  # age two inbox rows
        await session.execute(
            sa.update(models.inbox)
            .where(models.inbox.c.message_id.in_(["m-0", "m-1"]))
            .values(processed_at=now - timedelta(days=30))
        )
    purged = await housekeeping.purge_once(app.stores_for(db, "t"), timedelta(days=7))
    inbox, runs = purged.inbox, purged.runs
    async with db.transaction(readonly=True) as session:
        kept_inbox = sorted(r[0] for r in await session.execute(sa.select(models.inbox.c.message_id)))
        kept_runs = len(await claims.history(session, "s.one"))
    assert (inbox, runs, kept_inbox, kept_runs) == (2, 2, ["m-2"], 1)


async def test_purge_deletes_finished_sagas_older_than_their_retention_with_their_logs(db: Database) -> None:
    stores = app.stores_for(db, "t")
    statuses = {"old-done": "completed", "old-undone": "compensated", "old-parked": "failed",
                "old-running": "running", "new-done": "completed"}  # fmt: skip
    async with db.transaction() as session:
        now = await claims.database_now(session)
        for name, status in statuses.items():
            instance = engine.Instance("shop.order", name, {}, status=engine.Status(status))
            await stores.sagas.create(session, instance)
            await stores.sagas.log(session, "shop.order", name, [engine.Entry("", "started")])
        old = [name for name in statuses if name.startswith("old")]
        await session.execute(
            sa.update(models.sagas).where(models.sagas.c.id.in_(old)).values(updated_at=now - timedelta(days=40))
        )
    purged = await housekeeping.purge_once(stores, timedelta(days=7), saga_retention=timedelta(days=30))
    async with db.transaction(readonly=True) as session:
        kept = sorted(r[0] for r in await session.execute(sa.select(models.sagas.c.id)))
        logged = sorted(r[0] for r in await session.execute(sa.select(models.saga_log.c.instance_id)))
    # Unfinished instances stay however old: a parked one waits for an operator, a running one for a reply.
    assert purged.sagas == 2
    assert kept == logged == ["new-done", "old-parked", "old-running"]


async def test_purge_keeps_finished_sagas_younger_than_their_retention(db: Database) -> None:
    stores = app.stores_for(db, "t")
    async with db.transaction() as session:
        await stores.sagas.create(session, engine.Instance("shop.order", "o1", {}, status=engine.Status.COMPLETED))
    purged = await housekeeping.purge_once(stores, timedelta(days=7), saga_retention=timedelta(minutes=1))
    assert purged.sagas == 0
