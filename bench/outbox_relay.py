"""Outbox and relay figures: insert throughput, relay throughput, commit-to-publish latency.

Run: ``.venv/bin/python bench/outbox_relay.py`` (PostgreSQL at
``CONVEYOR_BENCH_POSTGRES_URL``, default postgresql+asyncpg://postgres@127.0.0.1:5432/test;
a scratch database is created and dropped). Prints:

* outbox insert rows/s through ``Outbox.add`` in transactions of 1 and 100 rows,
  on SQLite and PostgreSQL, next to raw asyncpg inserts into the same table;
* relay throughput to the memory transport (and to RabbitMQ / NATS when their
  transports and servers are available);
* commit-to-publish latency p50/p99 on PostgreSQL with LISTEN/NOTIFY and with
  polling only.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson
import sqlalchemy as sa
from conveyor import envelope, ports, transports
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import Collector
from conveyor.transports.memory import MemoryTransport
from sqlalchemy.engine import make_url

from event_store import Database, Outbox, SqlOutboxStore, upgrade

PG_URL = os.environ.get("CONVEYOR_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
TOPIC = "bench.outbox"
PAYLOAD = {"order_id": "o-123", "total_cents": 4200, "note": "x" * 200}


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _scratch_pg() -> str:
    name = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_dsn(PG_URL))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    await upgrade(url)
    return url


async def _drop_pg(url: str) -> None:
    admin = await asyncpg.connect(_dsn(PG_URL))
    await admin.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    await admin.close()


async def _truncate(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(sa.text("DELETE FROM outbox"))


async def _rate(rows: int, work: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await work()
    return rows / (time.perf_counter() - started)


async def outbox_inserts(db: Database, batch: int, rows: int) -> float:
    """Rows/s through Outbox.add, ``batch`` rows per transaction."""
    outbox = Outbox(source="bench")

    async def work() -> None:
        for _ in range(rows // batch):
            async with db.transaction() as session:
                for _ in range(batch):
                    await outbox.add(session, TOPIC, PAYLOAD, key=None)

    return await _rate(rows, work)


async def raw_asyncpg_inserts(url: str, batch: int, rows: int) -> float:
    """Rows/s inserting the same rows with asyncpg directly (one INSERT per row)."""
    connection = await asyncpg.connect(_dsn(url))
    event = envelope.create(TOPIC, PAYLOAD, source="bench")
    wire = envelope.to_binary(event, envelope.HTTP_PREFIX)
    headers = orjson.dumps(wire.headers).decode()
    statement = "INSERT INTO outbox (message_id, topic, partition_key, headers, body) VALUES ($1, $2, $3, $4, $5)"

    async def work() -> None:
        for _ in range(rows // batch):
            async with connection.transaction():
                for _ in range(batch):
                    await connection.execute(statement, str(uuid.uuid4()), TOPIC, None, headers, wire.body)

    try:
        return await _rate(rows, work)
    finally:
        await connection.close()


async def relay_throughput(db: Database, transport: ports.Transport, rows: int, keys: int) -> float:
    """Rows/s the relay moves to ``transport`` from a pre-filled outbox (``keys`` distinct keys + keyless)."""
    outbox = Outbox(source="bench")
    for start in range(0, rows, 500):
        async with db.transaction() as session:
            for n in range(start, min(start + 500, rows)):
                key = f"k{n % keys}" if keys and n % 2 else None
                await outbox.add(session, TOPIC, PAYLOAD, key=key)
    store = SqlOutboxStore(db, listen=False)
    relay = Relay(store, transport, options=RelayOptions(batch_size=200))

    async def work() -> None:
        published = 0
        while published < rows:
            published += (await relay.run_once()).published

    try:
        return await _rate(rows, work)
    finally:
        await store.close()


async def latency(url: str, *, listen: bool, poll_interval: float, samples: int) -> tuple[float, float]:
    """Commit-to-publish latency p50/p99 (ms) on PostgreSQL; producer and relay use separate pools."""
    broker_url = f"memory://bench-{uuid.uuid4().hex[:8]}"
    transport = MemoryTransport(broker_url)
    await transport.connect()
    collector = Collector()
    await transport.subscribe(ports.Subscription(name="bench-latency", topic=TOPIC, prefetch=10_000), collector)
    producer, relay_db = Database(url), Database(url)
    store = SqlOutboxStore(relay_db, listen=listen)
    relay = Relay(store, transport, options=RelayOptions(poll_interval=poll_interval))
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    committed: dict[str, float] = {}
    try:
        await asyncio.sleep(0.5)
        outbox = Outbox(source="bench")
        for _ in range(samples):
            async with producer.transaction() as session:
                event = await outbox.add(session, TOPIC, PAYLOAD)
            committed[event.id] = time.monotonic()
            await asyncio.sleep(random.uniform(0.005, 0.03))
        await collector.wait(samples, timeout=30.0)
    finally:
        stop.set()
        await task
        await store.close()
        await transport.close()
        await producer.close()
        await relay_db.close()
    delays = sorted(
        (r.at - committed[r.message.message_id or ""]) * 1000
        for r in collector.received
        if (r.message.message_id or "") in committed
    )
    return statistics.median(delays), delays[min(len(delays) - 1, int(len(delays) * 0.99))]


async def _broker_transports() -> list[tuple[str, ports.Transport | str]]:
    found: list[tuple[str, ports.Transport | str]] = []
    for name, url in (("rabbitmq", "amqp://guest:guest@127.0.0.1:5672/"), ("nats", "nats://127.0.0.1:4222")):
        try:
            transport = transports.create(url)
            await asyncio.wait_for(transport.connect(), 10)
            await transport.declare([TOPIC], [])
        except Exception as exc:
            found.append((name, f"skipped ({type(exc).__name__}: {exc})"))
            continue
        found.append((name, transport))
    return found


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    sqlite_url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    await upgrade(sqlite_url)
    pg_url = await _scratch_pg()
    databases = {"sqlite": Database(sqlite_url), "postgres": Database(pg_url)}
    try:
        print("== outbox insert throughput (rows/s) ==")
        for name, db in databases.items():
            for batch, rows in ((1, 1000), (100, 5000)):
                rate = await outbox_inserts(db, batch, rows)
                print(f"{name:9s} Outbox.add  batch={batch:<4d} {rate:10.0f} rows/s")
            await _truncate(db)
        for batch, rows in ((1, 1000), (100, 5000)):
            rate = await raw_asyncpg_inserts(pg_url, batch, rows)
            print(f"{'postgres':9s} raw asyncpg batch={batch:<4d} {rate:10.0f} rows/s")
        await _truncate(databases["postgres"])

        print("== relay throughput (rows/s, batch 200, half keyed over 50 keys) ==")
        memory = MemoryTransport(f"memory://bench-{uuid.uuid4().hex[:8]}")
        await memory.connect()
        targets: list[tuple[str, ports.Transport | str]] = [("memory", memory), *await _broker_transports()]
        for target, transport in targets:
            if isinstance(transport, str):
                print(f"{target:9s} {transport}")
                continue
            for name, db in databases.items():
                rate = await relay_throughput(db, transport, 5000 if target == "memory" else 2000, keys=50)
                print(f"{name:9s} -> {target:8s} {rate:10.0f} msgs/s")
                await _truncate(db)
            await transport.close()

        print("== commit-to-publish latency on PostgreSQL (ms) ==")
        for label, listen, poll in (("LISTEN/NOTIFY", True, 1.0), ("poll 1.0s", False, 1.0), ("poll 0.1s", False, 0.1)):
            p50, p99 = await latency(pg_url, listen=listen, poll_interval=poll, samples=200)
            print(f"{label:14s} p50 {p50:8.2f}  p99 {p99:8.2f}")
    finally:
        for db in databases.values():
            await db.close()
        await _drop_pg(pg_url)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
