"""kill -9 of a ``conveyor relay`` in the middle of a 2,000-row outbox backlog: a second relay finishes it.

The service database (PostgreSQL) holds 2,000 outbox rows written with
:class:`event_store.Outbox`; a ``conveyor worker`` runs ``faultapp``. The first
relay is SIGKILLed while its claim holds a row that was published and applied
but not yet marked sent (:func:`kill_mid_claim` freezes it to see that); the
batch it had claimed is claimed again by a second relay and published again with the same message ids. The ledger must
show every row's effect exactly once: the inbox absorbs the republished copies
(on RabbitMQ the worker's ``duplicate`` count proves some came; JetStream drops
them itself, by ``Nats-Msg-Id`` within its duplicate window).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from pathlib import Path

import databases
import httpx
import ledger
import pytest
import sqlalchemy as sa
from cli import Process, free_port
from conveyor.testing import unique

from event_store import Database, Outbox
from event_store.database import normalize_url

BACKLOG = 2_000
KEYS = 16
LIMIT_S = 10.0
"""Longest time without an effect after the kill. The dead relay holds no lease: its claim is a
``FOR UPDATE SKIP LOCKED`` transaction that PostgreSQL aborts as soon as the killed process's socket
closes, so the rows are claimable at once. What remains is the second relay's start-up (interpreter,
imports, connections, topology: 2-4 s on this 2-core machine) plus one ``poll_interval`` (1 s) before its
first claim if it missed the notification; 10 s leaves room for a loaded machine."""
IN_FLIGHT = """
SELECT EXISTS (SELECT 1 FROM ledger l JOIN outbox o ON o.message_id = l.message_id WHERE o.sent_at IS NULL)
"""
"""A row the relay published and the worker applied, not yet marked sent: the kill makes it a republish."""
SETTLE_S = 0.5
"""How long a frozen relay's published messages get to reach the ledger before the freeze is judged."""


def kill_mid_claim(url: str, relay: Process) -> None:
    """SIGKILL ``relay`` while its open claim holds a row that was published and applied but not marked sent.

    The relay is frozen (SIGSTOP) at arbitrary moments once a quarter of the backlog is sent; frozen, its
    claim cannot commit, so the ledger shows within :data:`SETTLE_S` whether a row it published is still
    unmarked. If so the kill lands in the window a crash republishes; if not (frozen between batches) it
    resumes and is frozen again a little later. A kill that republishes nothing would not test the inbox.
    """
    unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
    deadline = time.monotonic() + 90
    engine = sa.create_engine(normalize_url(url, sync=True))
    try:
        with engine.connect() as poll:
            while True:
                sent = BACKLOG - int(poll.execute(sa.text(unsent)).scalar_one())
                poll.commit()
                assert sent < BACKLOG, "the first relay published the whole backlog before a kill could land"
                assert relay.popen.poll() is None, relay.text()
                assert time.monotonic() < deadline, f"no kill landed mid-claim; the first relay published {sent} rows"
                if sent < BACKLOG // 4:
                    time.sleep(0.02)
                    continue
                os.kill(relay.popen.pid, signal.SIGSTOP)
                settled = time.monotonic() + SETTLE_S
                while time.monotonic() < settled:
                    in_flight = bool(poll.execute(sa.text(IN_FLIGHT)).scalar_one())
                    poll.commit()
                    if in_flight:
                        relay.popen.kill()  # SIGKILL is delivered to a stopped process
                        return
                    time.sleep(0.05)
                os.kill(relay.popen.pid, signal.SIGCONT)
                time.sleep(random.uniform(0.0, 0.05))
    finally:
        engine.dispose()


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
            for n in range(BACKLOG):
                await Outbox("fault").add(session, topic, {"n": n}, key=f"k{n % KEYS}")
    finally:
        await database.close()


@pytest.mark.parametrize("broker", ["rabbit", "nats"])
def test_relay_killed_mid_backlog_loses_and_doubles_nothing(
    broker: str, postgres_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    broker_url = request.getfixturevalue(f"{broker}_url")
    url = databases.create("postgres")
    ledger.create_ledger(url)
    topic, handler = unique("relaykill"), unique("relaykill")
    asyncio.run(seed(url, topic))
    env = {
        **ledger.write_app(tmp_path), "CONVEYOR_DATABASE_URL": url, "CONVEYOR_BROKER_URL": broker_url,
        "FAULT_TOPIC": topic, "FAULT_HANDLER": handler,
    }  # fmt: skip
    unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
    port = free_port()
    worker = Process(["worker", "--port", str(port)], tmp_path / "worker.log", cwd=tmp_path, **env)
    relays: list[Process] = []
    try:
        worker.wait_ready(port, timeout=60)
        relays.append(Process(["relay", "--port", "0"], tmp_path / "relay1.log", cwd=tmp_path, **env))
        kill_mid_claim(url, relays[0])
        relays[0].popen.wait()
        killed = time.time()
        left, applied = scalar(url, unsent), scalar(url, "SELECT count(*) FROM ledger")
        assert 0 < left < BACKLOG and applied < BACKLOG, f"not mid-backlog: {left} unsent, {applied} applied"
        relays.append(Process(["relay", "--port", "0"], tmp_path / "relay2.log", cwd=tmp_path, **env))
        deadline = time.monotonic() + 90
        while scalar(url, unsent) or scalar(url, "SELECT count(DISTINCT n) FROM ledger") < BACKLOG:
            assert worker.popen.poll() is None and relays[1].popen.poll() is None, worker.text()
            if time.monotonic() > deadline:
                break  # judged below: what is missing is lost
            time.sleep(0.2)
        time.sleep(1.0)  # a late duplicate would land now
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        for process in (relays[1], worker):
            assert process.terminate() == 0, process.text()
        rows = ledger.effects(url)
    finally:
        for process in (*relays, worker):
            process.close()
        databases.drop(url)
    tally = ledger.tally(rows, range(BACKLOG))
    result = ledger.report(
        ledger.Result(
            scenario="relay kill -9 mid-backlog", broker=broker, load=BACKLOG, faults=1, bad_inputs=0,
            lost=tally.lost, doubled=tally.doubled, stalled_s=ledger.longest_stall(rows, since=killed), limit_s=LIMIT_S,
        )
    )  # fmt: skip
    found = re.search(rf'conveyor_messages_total{{handler="{re.escape(handler)}",outcome="duplicate"}} (\S+)', metrics)
    print(f"killed with {left} of {BACKLOG} rows unsent, {applied} effects in; duplicates absorbed:",
          found.group(1) if found else 0)  # fmt: skip
    assert result.ok, result
    if broker == "rabbit":  # JetStream drops the republished copies itself (same Nats-Msg-Id within its window)
        assert found and float(found.group(1)) >= 1, "the kill republished nothing: the inbox was not put to the test"
