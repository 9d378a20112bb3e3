"""A relay that dies between publishing and marking sent: the republished duplicates are absorbed by the inbox.

``conveyor relay`` runs with ``CONVEYOR_CRASH_AT=relay.after-publish`` and exits
(status 70) right after the broker confirmed its first batch; a second relay
publishes the same messages again. A ``conveyor worker`` whose handler writes its
effect inside ``ctx.transaction()`` must apply each of the N messages once:
N effects, none lost, none doubled, and the duplicates visible in its metrics.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import databases
import httpx
import sqlalchemy as sa
from cli import Process, free_port
from conveyor.testing import unique

from event_store import Database, Outbox
from event_store.database import normalize_url

APP = """
import os

import sqlalchemy as sa

from conveyor import Context, on


@on(os.environ["CRASH_TOPIC"], name=os.environ["CRASH_HANDLER"])
async def apply(payload: dict, ctx: Context) -> None:
    async with ctx.transaction() as tx:
        await tx.session.execute(sa.text("INSERT INTO effects (message_id) VALUES (:id)"), {"id": ctx.message.id})
"""
COUNT = 40


def scalar(url: str, sql: str) -> int:
    engine = sa.create_engine(normalize_url(url, sync=True))
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


async def seed(url: str, topic: str) -> None:
    database = Database(url)
    try:
        async with database.transaction() as session:
            await session.execute(sa.text("CREATE TABLE effects (message_id VARCHAR(64) NOT NULL)"))
            for n in range(COUNT):
                await Outbox("e2e").add(session, topic, {"n": n}, key=f"k{n % 5}")
    finally:
        await database.close()


def test_relay_crash_after_publish_yields_each_effect_once(postgres_url: str, rabbit_url: str, tmp_path: Path) -> None:
    url = databases.create("postgres")
    topic, handler = unique("crash"), unique("crash")
    asyncio.run(seed(url, topic))
    (tmp_path / "crashapp.py").write_text(APP)
    env = {
        "CONVEYOR_DATABASE_URL": url, "CONVEYOR_BROKER_URL": rabbit_url, "CONVEYOR_APP": "crashapp",
        "CONVEYOR_APP_DIR": str(tmp_path), "CRASH_TOPIC": topic, "CRASH_HANDLER": handler,
    }  # fmt: skip
    port = free_port()
    worker = Process(["worker", "--port", str(port)], tmp_path / "worker.log", cwd=tmp_path, **env)
    relays: list[Process] = []
    try:
        worker.wait_ready(port)
        crashing = Process(["relay", "--port", "0"], tmp_path / "relay1.log", cwd=tmp_path,
                           CONVEYOR_CRASH_AT="relay.after-publish", **env)  # fmt: skip
        relays.append(crashing)
        assert crashing.popen.wait(60) == 70, crashing.text()
        assert scalar(url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == COUNT, (
            "the crash came before marking"
        )
        relays.append(Process(["relay", "--port", "0"], tmp_path / "relay2.log", cwd=tmp_path, **env))
        deadline = time.monotonic() + 60
        while (
            scalar(url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            or scalar(url, "SELECT count(*) FROM effects") < COUNT
        ):
            assert time.monotonic() < deadline, worker.text()
            time.sleep(0.2)
        time.sleep(0.5)  # any late duplicate would land now
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        for process in (*relays[1:], worker):
            assert process.terminate() == 0, process.text()
    finally:
        for process in (*relays, worker):
            process.close()
    effects, distinct = (
        scalar(url, "SELECT count(*) FROM effects"), scalar(url, "SELECT count(DISTINCT message_id) FROM effects"),
    )  # fmt: skip
    databases.drop(url)
    assert (effects, distinct) == (COUNT, COUNT), "an effect was lost or applied twice"
    found = re.search(rf'conveyor_messages_total{{handler="{re.escape(handler)}",outcome="duplicate"}} (\S+)', metrics)
    assert found and float(found.group(1)) >= 1, "the republished duplicates never reached the worker"
