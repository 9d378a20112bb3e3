"""``conveyor outbox list|show|retry|purge`` as an operator runs it, against a SQLite file a relay parked rows in."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cli import migrated, run
from conveyor.runtime.relay import Relay, RelayOptions
from relay_helpers import TOPIC, Refusing, add, connected, open_broker

from event_store import Database, SqlOutboxStore


@dataclass
class Outbox:
    """A migrated SQLite file whose first row of key ``k`` was parked; ``ids`` are the key's rows in order."""

    env: dict[str, str]
    ids: list[str]


async def _park_first_of_key(url: str) -> list[str]:
    db = Database(url)
    try:
        ids = await add(db, 3, key="k")
        async with open_broker() as broker:
            store = SqlOutboxStore(db, listen=False)
            options = RelayOptions(max_attempts=2, retry_base=0.0)
            relay = Relay(store, await connected(Refusing(broker.url, {"k"})), options=options)
            await relay.run_once()
            await relay.run_once()  # the second refusal parks it
            await store.close()
        return ids
    finally:
        await db.close()


async def _relay_once(url: str) -> dict[str, list[int]]:
    db = Database(url)
    try:
        async with open_broker() as broker:
            store = SqlOutboxStore(db, listen=False)
            await Relay(store, broker.transport).run_once()
            await store.close()
            return dict(broker.by_key())
    finally:
        await db.close()


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    env = migrated(tmp_path)
    return Outbox(env, asyncio.run(_park_first_of_key(env["CONVEYOR_DATABASE_URL"])))


def test_outbox_list_parked_shows_only_the_parked_message(outbox: Outbox) -> None:
    listing = run(["outbox", "list", "--parked"], **outbox.env)
    assert (listing.returncode, outbox.ids[0] in listing.stdout, outbox.ids[1] in listing.stdout) == (0, True, False)


def test_outbox_retry_publishes_parked_message_before_later_ones_of_its_key(outbox: Outbox) -> None:
    retried = run(["outbox", "retry", outbox.ids[0]], **outbox.env)
    assert retried.returncode == 0, retried.stderr
    assert asyncio.run(_relay_once(outbox.env["CONVEYOR_DATABASE_URL"])) == {"k": [0, 1, 2]}


def test_outbox_show_prints_attempts_last_error_and_json_body(outbox: Outbox) -> None:
    shown = run(["outbox", "show", outbox.ids[0]], **outbox.env)
    assert (shown.returncode, "attempts: 2" in shown.stdout, "refused" in shown.stdout, '"n": 0' in shown.stdout) == (
        0, True, True, True,
    ), shown.stdout + shown.stderr  # fmt: skip


def test_outbox_show_unknown_message_id_exits_2(outbox: Outbox) -> None:
    shown = run(["outbox", "show", "no-such-id"], **outbox.env)
    assert (shown.returncode, "no-such-id" in shown.stderr) == (2, True)


def test_outbox_purge_all_with_yes_deletes_parked_messages(outbox: Outbox) -> None:
    purged = run(["outbox", "purge", "--all", "--yes"], **outbox.env)
    listing = run(["outbox", "list", "--parked"], **outbox.env)
    assert (purged.returncode, "purged 1" in purged.stdout, "no parked" in listing.stdout) == (0, True, True)


def test_outbox_purge_without_yes_exits_2_and_keeps_message(outbox: Outbox) -> None:
    purged = run(["outbox", "purge", outbox.ids[0]], **outbox.env)
    listing = run(["outbox", "list", "--parked"], **outbox.env)
    assert (purged.returncode, outbox.ids[0] in listing.stdout) == (2, True)


def test_outbox_retry_without_ids_or_all_exits_2(outbox: Outbox) -> None:
    assert run(["outbox", "retry"], **outbox.env).returncode == 2


def test_outbox_list_invalid_max_attempts_setting_exits_2(outbox: Outbox) -> None:
    listing = run(["outbox", "list"], CONVEYOR_RELAY_MAX_ATTEMPTS="0", **outbox.env)
    assert (listing.returncode, "CONVEYOR_RELAY_MAX_ATTEMPTS" in listing.stderr) == (2, True)


def test_outbox_list_unmigrated_database_exits_2(tmp_path: Path) -> None:
    listing = run(["outbox", "list"], CONVEYOR_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    assert (listing.returncode, "conveyor db upgrade" in listing.stderr) == (2, True)


def test_outbox_topics_counts_unsent_and_parked_messages_per_topic(outbox: Outbox) -> None:
    asyncio.run(_add(outbox.env["CONVEYOR_DATABASE_URL"], 2, "relay.other"))
    listing = run(["outbox", "topics"], **outbox.env)
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()]
    assert rows == [
        ["TOPIC", "UNSENT", "DUE", "SCHEDULED", "PARKED"], ["relay.other", "2", "2", "0", "0"],
        [TOPIC, "3", "2", "0", "1"],
    ], listing.stdout  # fmt: skip


def test_outbox_list_and_topics_json_and_a_notice_when_the_limit_cuts_the_list(outbox: Outbox) -> None:
    asyncio.run(_add(outbox.env["CONVEYOR_DATABASE_URL"], 2, "relay.later", delay=timedelta(minutes=5)))
    listing = run(["outbox", "list", "--json", "--limit", "4"], **outbox.env)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["message_id"], r["status"]) for r in rows] == [
        (outbox.ids[0], "parked"), (outbox.ids[1], "due"), (outbox.ids[2], "due"), (rows[3]["message_id"], "scheduled"),
    ]  # fmt: skip
    assert "first 4" in listing.stderr and "--limit" in listing.stderr, listing.stderr
    table = run(["outbox", "list"], **outbox.env)
    assert (table.stdout.count(" scheduled "), table.stderr.strip()) == (2, ""), table.stdout + table.stderr
    topics = run(["outbox", "topics", "--json", "--limit", "1"], **outbox.env)
    assert json.loads(topics.stdout) == [{"topic": "relay.later", "unsent": 2, "due": 0, "scheduled": 2, "parked": 0}]
    assert "first 1" in topics.stderr, topics.stderr


def test_outbox_help_explains_the_columns() -> None:
    listing = " ".join(run(["outbox", "list", "--help"]).stdout.split())
    topics = " ".join(run(["outbox", "topics", "--help"]).stdout.split())
    assert "scheduled" in listing and "SINCE / DUE" in listing, listing
    assert "SCHEDULED" in topics and "DUE" in topics, topics


async def _add(url: str, count: int, topic: str, **kw: Any) -> None:
    db = Database(url)
    try:
        await add(db, count, topic=topic, **kw)
    finally:
        await db.close()
