"""``conveyor sagas list|show|retry|abort`` against a real (SQLite) database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import sqlalchemy as sa
from cli import migrated, run
from conveyor import envelope
from conveyor.sagas import engine

from event_store import Database
from event_store.sagas import SqlSagaStore


async def seed(url: str) -> None:
    database = Database(url)
    store = SqlSagaStore()
    try:
        async with database.transaction() as tx:
            parked = engine.Instance("shop.checkout", "o1", {"order_id": "o1"}, engine.Status.FAILED, step=0,
                                     error="the undo of step 'charge' failed 10 times", version=7)  # fmt: skip
            done = engine.Instance("shop.checkout", "o2", {"order_id": "o2"}, engine.Status.COMPLETED, step=2)
            for instance in (parked, done):
                assert await store.create(tx, instance)
            await store.log(tx, "shop.checkout", "o1", [engine.Entry("charge", "parked", "bank down")])
    finally:
        await database.close()


async def outbox_events(url: str) -> list[tuple[str, envelope.Envelope]]:
    database = Database(url)
    try:
        async with database.transaction(readonly=True) as tx:
            rows = (await tx.execute(sa.text("SELECT topic, headers, body FROM outbox"))).all()
    finally:
        await database.close()
    return [(topic, envelope.decode(envelope.WireMessage(bytes(body), json.loads(h)))) for topic, h, body in rows]


def test_operators_list_show_and_retry_a_parked_saga(tmp_path: Path) -> None:
    env = migrated(tmp_path)
    asyncio.run(seed(env["CONVEYOR_DATABASE_URL"]))
    listed = run(["sagas", "list", "--status", "failed"], **env)
    assert listed.returncode == 0, listed.stderr
    assert "o1" in listed.stdout and "o2" not in listed.stdout and "failed 10 times" in listed.stdout
    shown = run(["sagas", "show", "o1"], **env)
    assert shown.returncode == 0, shown.stderr
    assert "status: failed" in shown.stdout and "parked" in shown.stdout and "bank down" in shown.stdout
    retried = run(["sagas", "retry", "o1"], **env)
    assert retried.returncode == 0, retried.stderr
    [(topic, event)] = asyncio.run(outbox_events(env["CONVEYOR_DATABASE_URL"]))
    assert (topic, event.type, event.extensions.get("sagaid"), event.extensions.get("sagaaction")) == (
        "sagas.shop.checkout", "conveyor.saga.control", "o1", "retry",
    )  # fmt: skip


def test_a_saga_that_is_not_running_cannot_be_aborted(tmp_path: Path) -> None:
    env = migrated(tmp_path)
    asyncio.run(seed(env["CONVEYOR_DATABASE_URL"]))
    refused = run(["sagas", "abort", "o2"], **env)
    assert refused.returncode == 2
    assert "is completed: only a running instance can be aborted" in refused.stderr
    missing = run(["sagas", "show", "nope"], **env)
    assert (missing.returncode, "no saga instance 'nope'" in missing.stderr) == (2, True)
