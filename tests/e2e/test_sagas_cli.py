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


async def seed_many(url: str) -> None:
    database = Database(url)
    store = SqlSagaStore()
    instances = [
        engine.Instance("shop.checkout", "p1", {}, engine.Status.FAILED, error="undo failed"),
        engine.Instance("shop.checkout", "p2", {}, engine.Status.FAILED, error="undo failed"),
        engine.Instance("shop.refund", "p3", {}, engine.Status.FAILED, error="undo failed"),
        engine.Instance("shop.checkout", "r1", {}, engine.Status.RUNNING, waiting="1"),
        engine.Instance("shop.refund", "r2", {}, engine.Status.RUNNING, waiting="1"),
        engine.Instance("shop.checkout", "c1", {}, engine.Status.COMPENSATED, step=-1, error="step 'x' failed"),
    ]
    try:
        async with database.transaction() as tx:
            for instance in instances:
                assert await store.create(tx, instance)
    finally:
        await database.close()


def controls(url: str) -> list[tuple[str, str | None, str | None]]:
    found = asyncio.run(outbox_events(url))
    return sorted((topic, e.extensions.get("sagaid"), e.extensions.get("sagaaction")) for topic, e in found)


def test_sagas_retry_all_of_a_saga_needs_yes_then_retries_each_of_its_failed_instances(tmp_path: Path) -> None:
    env = migrated(tmp_path)
    asyncio.run(seed_many(env["CONVEYOR_DATABASE_URL"]))
    unconfirmed = run(["sagas", "retry", "--all", "--saga", "shop.checkout"], **env)
    assert (unconfirmed.returncode, "--yes" in unconfirmed.stderr) == (2, True), unconfirmed.stderr
    assert controls(env["CONVEYOR_DATABASE_URL"]) == []
    retried = run(["sagas", "retry", "--all", "--saga", "shop.checkout", "--yes"], **env)
    assert retried.returncode == 0, retried.stderr
    assert "2 failed instance(s)" in retried.stdout, retried.stdout
    assert controls(env["CONVEYOR_DATABASE_URL"]) == [
        ("sagas.shop.checkout", "p1", "retry"), ("sagas.shop.checkout", "p2", "retry"),
    ]  # fmt: skip


def test_sagas_abort_all_aborts_every_running_instance_and_ids_with_all_is_a_usage_error(tmp_path: Path) -> None:
    env = migrated(tmp_path)
    asyncio.run(seed_many(env["CONVEYOR_DATABASE_URL"]))
    both = run(["sagas", "abort", "r1", "--all", "--yes"], **env)
    assert both.returncode == 2, both.stderr
    aborted = run(["sagas", "abort", "--all", "--yes"], **env)
    assert aborted.returncode == 0, aborted.stderr
    assert controls(env["CONVEYOR_DATABASE_URL"]) == [
        ("sagas.shop.checkout", "r1", "abort"), ("sagas.shop.refund", "r2", "abort"),
    ]  # fmt: skip


def test_sagas_list_json_gives_every_field_and_says_when_more_instances_than_the_limit_exist(tmp_path: Path) -> None:
    env = migrated(tmp_path)
    asyncio.run(seed_many(env["CONVEYOR_DATABASE_URL"]))
    listed = run(["sagas", "list", "--json", "--limit", "4"], **env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 4
    assert {"saga", "id", "status", "step", "waiting", "deadline", "error", "cause", "updated_at"} <= set(rows[0])
    assert "first 4" in listed.stderr and "--limit" in listed.stderr, listed.stderr
    table = run(["sagas", "list", "--limit", "4"], **env)
    assert "first 4" in table.stderr, table.stderr
    everything = run(["sagas", "list", "--json"], **env)
    assert (len(json.loads(everything.stdout)), everything.stderr.strip()) == (6, "")


def test_sagas_help_says_failed_for_parked_and_explains_the_step_column(tmp_path: Path) -> None:
    group = run(["sagas", "--help"])
    assert "failed" in group.stdout, group.stdout
    listing = run(["sagas", "list", "--help"])
    flat = " ".join(listing.stdout.split())
    assert "-1" in flat and "compensated" in flat and "completed" in flat, flat
