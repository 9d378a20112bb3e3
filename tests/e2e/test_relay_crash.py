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
from collections.abc import Callable
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


def scalar(url: str, sql: str, **params: object) -> int:
    engine = sa.create_engine(normalize_url(url, sync=True))
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text(sql), params).scalar_one())
    finally:
        engine.dispose()


async def add_marker(url: str, topic: str) -> str:
    """One more outbox row, keyless; return its message id."""
    database = Database(url)
    try:
        async with database.transaction() as session:
            return (await Outbox("e2e").add(session, topic, {"n": -1})).id
    finally:
        await database.close()


def duplicates(metrics: str, handler: str) -> float:
    found = re.search(rf'conveyor_messages_total{{handler="{re.escape(handler)}",outcome="duplicate"}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str, worker: Process) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert worker.popen.poll() is None, f"the worker exited while waiting for {what}:\n{worker.text()}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}:\n{worker.text()}"
        time.sleep(0.2)


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
        unsent, applied = "SELECT count(*) FROM outbox WHERE sent_at IS NULL", "SELECT count(*) FROM effects"
        wait_until(
            lambda: scalar(url, unsent) == 0 and scalar(url, applied) >= COUNT,
            60,
            f"every row sent and {COUNT} effects",
            worker,
        )
        # Every republished copy is in the queue ahead of this marker, so once the
        # marker's effect is in, the worker has taken them all (and the drain at
        # SIGTERM finishes them): no late duplicate can land after the count.
        marker = asyncio.run(add_marker(url, topic))
        effect_of = "SELECT count(*) FROM effects WHERE message_id = :id"
        wait_until(lambda: scalar(url, effect_of, id=marker) > 0, 60, "the marker's effect", worker)
        wait_until(
            lambda: duplicates(httpx.get(f"http://127.0.0.1:{port}/metrics").text, handler) >= 1,
            30,
            "the republished duplicates to reach the worker",
            worker,
        )
        for process in (*relays[1:], worker):
            assert process.terminate() == 0, process.text()
    finally:
        for process in (*relays, worker):
            process.close()
    others = "FROM effects WHERE message_id <> :id"
    effects, distinct = (
        scalar(url, f"SELECT count(*) {others}", id=marker),
        scalar(url, f"SELECT count(DISTINCT message_id) {others}", id=marker),
    )  # fmt: skip
    databases.drop(url)
    assert (effects, distinct) == (COUNT, COUNT), "an effect was lost or applied twice"
