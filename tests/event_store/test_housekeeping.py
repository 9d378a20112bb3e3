"""Retention: old inbox rows and finished schedule runs are purged; recent ones and each schedule's latest stay."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from conveyor.runtime import app, housekeeping

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
    inbox, runs = await housekeeping.purge_once(app.stores_for(db, "t"), timedelta(days=7))
    async with db.transaction(readonly=True) as session:
        kept_inbox = sorted(r[0] for r in await session.execute(sa.select(models.inbox.c.message_id)))
        kept_runs = len(await claims.history(session, "s.one"))
    assert (inbox, runs, kept_inbox, kept_runs) == (2, 2, ["m-2"], 1)
