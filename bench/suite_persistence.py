"""Persistence figures on PostgreSQL: transactional handlers, ``Outbox.add``, the relay, commit-to-publish latency.

Rows (raw client vs Conveyor, interleaved by :mod:`bench.harness`):

* **transactional handler, PostgreSQL, concurrency 1 / 16**: raw = that many
  asyncpg connections (a pool of that size, each held by one loop), each
  message one transaction (``async with conn.transaction()``): its JSON decoded,
  the inbox insert ``ON CONFLICT DO NOTHING``, one user insert and the outbox
  insert of the reply (headers built by hand, :func:`bench.outbox_relay.event_headers`),
  commit; Conveyor = a real :class:`~conveyor.runtime.worker.Worker` on the
  memory transport with a ``transactional=True`` handler doing one insert
  through ``tx`` and one ``ctx.publish`` (an outbox row), the backlog published
  before the clock starts.
* **Outbox.add in a user session**: one row per transaction, nothing else in
  it; raw = ``conn.execute(INSERT INTO outbox ...)`` inside ``async with
  conn.transaction()`` on one asyncpg connection, the same columns and values
  (headers built by hand per row); Conveyor = ``Outbox.add`` in a session of
  :class:`~event_store.Database`.
* **relay -> RabbitMQ / NATS**: both sides drain the same backlog of
  :data:`RELAY_ROWS` 1 KB rows (half keyed over 50 keys) to the same exchange
  or stream, until the last mark committed; raw = :func:`bench.outbox_relay.relay_by_hand`
  (claim 1,000 rows ``FOR UPDATE SKIP LOCKED``, publish, one batched ``UPDATE``,
  commit) on asyncpg, publishing the bytes and headers Conveyor's transport
  sends with aiormq (confirms, window 256) / nats-py ``publish_async`` (256
  pending); Conveyor = ``Relay.run`` (pipelined: claims ahead, marks behind).

Separately (``--latency``), commit throughput and commit-to-publish latency
(p50/p99) with 1, 10 and 50 concurrent writers, one ``Outbox.add`` per
transaction, for each wake-up design: the NOTIFY trigger, ``pg_notify`` once
per transaction, polling every 10 ms (see :func:`notify_study`).

    .venv/bin/python -m bench.suite_persistence [--runs 3] [--only relay] [--latency]

PostgreSQL at ``CONVEYOR_BENCH_POSTGRES_URL`` (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test); scratch databases are
created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
from conveyor import Context, envelope, ports, registry, stores, transports
from conveyor.runtime.relay import Relay, RelayOptions, RoundResult
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique
from conveyor.transports.memory import MemoryTransport
from sqlalchemy.engine import make_url

from bench import harness, outbox_relay, raw_clients
from event_store import Database, Outbox, SqlOutboxStore, sql_persistence, upgrade

PG_URL = os.environ.get("CONVEYOR_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
HANDLER_COUNT = {1: 1500, 16: 4000}
"""Messages per handler run, by concurrency (a run takes a few seconds)."""
OUTBOX_ROWS = 3000
PAYLOAD = {"order_id": "o-123", "total_cents": 4200, "note": "x" * 200}
EFFECTS = sa.table("effects", sa.column("id", sa.String))


def dsn(url: str) -> str:
    """The asyncpg DSN of a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(dsn(PG_URL))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A migrated scratch PostgreSQL database with an ``effects`` table; dropped on exit."""
    name = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        await upgrade(url)
        connection = await asyncpg.connect(dsn(url))
        await connection.execute("CREATE TABLE effects (id VARCHAR(64) PRIMARY KEY)")
        await connection.close()
        yield url
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def execute(url: str, sql: str) -> None:
    """Run ``sql`` on the database at ``url`` (not timed)."""
    connection = await asyncpg.connect(dsn(url))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def reset(url: str) -> None:
    """Empty the tables the rows write (not timed)."""
    await execute(url, "TRUNCATE effects, inbox, outbox")


# -- transactional handler ---------------------------------------------------------------------------------------


async def raw_handler(url: str, concurrency: int, count: int) -> float:
    """Messages/s: ``concurrency`` asyncpg loops, each message inbox + user insert + outbox insert in a transaction.

    Each loop holds its pool connection for the run: giving it back after each
    message would add asyncpg's reset query (a round trip) that Conveyor's pool
    does not pay.
    """
    await reset(url)
    body = orjson.dumps(PAYLOAD)
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for _ in range(count):
        queue.put_nowait((str(uuid.uuid4()), body))
    pool = await asyncpg.create_pool(dsn(url), min_size=concurrency, max_size=concurrency)
    inbox = "INSERT INTO inbox (handler, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    effect = "INSERT INTO effects (id) VALUES ($1)"

    async def work() -> None:
        async with pool.acquire() as connection:
            while not queue.empty():
                message_id, data = queue.get_nowait()
                order = orjson.loads(data)
                async with connection.transaction():
                    status = await connection.execute(inbox, "bench.handler", message_id)
                    if status.endswith(" 1"):
                        await connection.execute(effect, message_id)
                        reply = str(uuid.uuid4())
                        headers = outbox_relay.event_headers(
                            reply, "bench.out", source="bench", key=message_id, cause=message_id
                        )
                        await connection.execute(
                            outbox_relay.OUTBOX_INSERT, reply, "bench.out", message_id, headers, orjson.dumps(order)
                        )

    try:
        started = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)
    finally:
        await pool.close()


async def conveyor_handler(url: str, concurrency: int, count: int) -> float:
    """Messages/s: a Worker running a ``transactional=True`` handler (one insert via ``tx``, one publish)."""
    await reset(url)
    db = Database(url, pool_size=concurrency + 2)
    transport = MemoryTransport(f"memory://{unique('bench')}")
    await transport.connect()
    topic = unique("bench-in")

    @registry.on(topic, name=unique("bench.handler"), transactional=True, concurrency=concurrency)
    async def record(order: dict[str, Any], ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.insert(EFFECTS).values(id=ctx.message.id))
        ctx.publish("bench.out", order, key=ctx.message.id)

    stores = sql_persistence(db, "bench")
    worker = Worker(
        registry.Registry.of(record).handlers, transport, source="bench", concurrency=concurrency,
        transactions=stores.units,
    )  # fmt: skip
    await worker.declare()
    for _ in range(count):
        await transport.publish(topic, envelope.to_binary(envelope.create(topic, PAYLOAD, source="bench"), "ce-"))
    try:
        started = time.perf_counter()
        await worker.start()
        while await _count(db, "SELECT count(*) FROM outbox") < count:  # noqa: ASYNC110 - the database is the signal
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        await worker.stop(5)
        await transport.close()
        await db.close()
    return count / elapsed


async def _count(db: Database, sql: str) -> int:
    async with db.transaction(readonly=True) as session:
        return int((await session.execute(sa.text(sql))).scalar_one())


# -- Outbox.add in a user session -------------------------------------------------------------------------------------


async def raw_outbox_insert(url: str, rows: int) -> float:
    """Rows/s: asyncpg inserting the row ``Outbox.add`` writes, one row per transaction, on one connection."""
    connection = await asyncpg.connect(dsn(url))
    try:
        started = time.perf_counter()
        for _ in range(rows):
            message_id = str(uuid.uuid4())
            headers = outbox_relay.event_headers(message_id, "bench.out", source="bench")
            async with connection.transaction():
                await connection.execute(
                    outbox_relay.OUTBOX_INSERT, message_id, "bench.out", None, headers, orjson.dumps(PAYLOAD)
                )
        return rows / (time.perf_counter() - started)
    finally:
        await connection.close()


async def conveyor_session_add(db: Database, rows: int) -> float:
    """Rows/s: ``Outbox.add`` in the user's session, one row per transaction."""
    outbox = Outbox(source="bench")
    started = time.perf_counter()
    for _ in range(rows):
        async with db.sessions() as session, session.begin():
            await outbox.add(session, "bench.out", PAYLOAD)
    return rows / (time.perf_counter() - started)


# -- relay -------------------------------------------------------------------------------------------------------------

RELAY_ROWS = 20_000
BROKERS = {"RabbitMQ": raw_clients.DEFAULT_RABBIT_URL, "NATS": raw_clients.DEFAULT_NATS_URL}


async def relay_destination(url: str) -> tuple[ports.Transport, str]:
    """A connected Conveyor transport and a topic of this run's own, declared with one subscription (not timed)."""
    transport = transports.create(url)
    await transport.connect()
    topic = unique("bench-relay")
    await transport.declare([topic], [ports.Subscription(name=unique("bench-relay"), topic=topic)])
    return transport, topic


async def raw_relay(db_url: str, url: str, rows: int) -> float:
    """Messages/s: a hand-written relay (asyncpg; aiormq or nats-py) draining a backlog of ``rows`` to ``url``."""
    transport, topic = await relay_destination(url)
    await transport.close()
    await execute(db_url, "TRUNCATE outbox")
    await outbox_relay.fill_outbox(dsn(db_url), topic, rows)
    connection = await asyncpg.connect(dsn(db_url))
    kind = outbox_relay.RabbitByHand if url.startswith("amqp") else outbox_relay.NatsByHand
    publisher = await kind.connect(url)
    try:
        started = time.perf_counter()
        sent = await outbox_relay.relay_by_hand(connection, publisher.publish)
        elapsed = time.perf_counter() - started
        if sent != rows:
            raise RuntimeError(f"the hand-written relay sent {sent} of {rows} rows")
        return rows / elapsed
    finally:
        await publisher.close()
        await connection.close()
        if url.startswith("amqp"):
            await brokers.delete_test_queues(url)


async def conveyor_relay(db: Database, url: str, rows: int) -> float:
    """Messages/s: the relay draining a backlog of ``rows`` to the broker at ``url``."""
    transport, topic = await relay_destination(url)
    db_url = db.url.render_as_string(hide_password=False)
    await execute(db_url, "TRUNCATE outbox")
    await outbox_relay.fill_outbox(dsn(db_url), topic, rows)
    store = SqlOutboxStore(db, listen=False)
    relay = Relay(store, transport)
    stop = asyncio.Event()
    published = [0]
    refusals: list[RoundResult] = []
    publish = relay._waves.publish  # counted here so that the run stops when the backlog is out

    async def counting(batch: stores.OutboxBatch) -> RoundResult:
        result = await publish(batch)
        if result.failed or result.interrupted:
            refusals.append(result)
        published[0] += result.published
        if published[0] >= rows or refusals:
            stop.set()
        return result

    relay._waves.publish = counting  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        await relay.run(stop)  # pipelined: claims ahead and marks behind; returns once the last mark committed
        if refusals:
            raise RuntimeError(f"the broker at {url} refused messages: {refusals[0]}")
        return rows / (time.perf_counter() - started)
    finally:
        await store.close()
        await transport.close()
        if url.startswith("amqp"):
            await brokers.delete_test_queues(url)


@contextlib.asynccontextmanager
async def suite() -> AsyncIterator[Sequence[harness.Row]]:
    """The persistence rows on a scratch PostgreSQL database."""
    async with scratch_database() as url:
        db = Database(url)
        try:

            async def session_raw() -> float:
                await reset(url)
                return await raw_outbox_insert(url, OUTBOX_ROWS)

            async def session_ours() -> float:
                await reset(url)
                return await conveyor_session_add(db, OUTBOX_ROWS)

            rows = [
                harness.Row(
                    f"transactional handler, PostgreSQL, concurrency {c}",
                    raw=lambda c=c: raw_handler(url, c, HANDLER_COUNT[c]),  # type: ignore[misc]
                    conveyor=lambda c=c: conveyor_handler(url, c, HANDLER_COUNT[c]),  # type: ignore[misc]
                    goal={1: 0.85, 16: 0.8}[c],
                    note=f"raw: {c} asyncpg connection(s) (pool of {c}, each held by one loop), per message "
                    "in conn.transaction(): inbox INSERT ON CONFLICT DO NOTHING + user INSERT + outbox INSERT "
                    "(headers built by hand); Conveyor: Worker, memory transport, transactional handler "
                    "(insert via tx + ctx.publish)",
                )
                for c in (1, 16)
            ]
            rows.append(
                harness.Row(
                    "Outbox.add in a user session",
                    raw=session_raw,
                    conveyor=session_ours,
                    goal=0.9,
                    unit="rows/s",
                    note="one row per transaction, nothing else in it; raw: asyncpg conn.execute(INSERT INTO "
                    "outbox ...) in conn.transaction(), same columns and values (headers built by hand); "
                    "Conveyor: Outbox.add in a Database session",
                )
            )
            for label, broker_url in BROKERS.items():
                publisher = (
                    "aiormq, confirms, window 256"
                    if label == "RabbitMQ"
                    else "nats-py core client: reply subjects, PubAcks matched on one subscription, a batch in flight"
                )
                rows.append(
                    harness.Row(
                        f"relay -> {label}",
                        raw=lambda u=broker_url: raw_relay(url, u, RELAY_ROWS),  # type: ignore[misc]
                        conveyor=lambda u=broker_url: conveyor_relay(db, u, RELAY_ROWS),  # type: ignore[misc]
                        goal=0.9,
                        note=f"a backlog of {RELAY_ROWS:,} rows of 1 KB, half keyed over 50 keys; raw: hand-written "
                        f"asyncpg relay (claim 1,000 FOR UPDATE SKIP LOCKED, publish, one UPDATE ... = ANY(ids), "
                        f"commit), the same bytes and headers ({publisher}); Conveyor: Relay.run",
                    )
                )
            yield rows
        finally:
            await db.close()


# -- wake-up designs: commit throughput and commit-to-publish latency ------------------------------------------------

WAKE_DESIGNS = ("trigger NOTIFY", "pg_notify per transaction", "poll 10 ms")
WRITER_COUNTS = {1: 600, 10: 150, 50: 40}
"""Transactions per writer, by the number of concurrent writers."""


class _Stamping(MemoryTransport):
    """A memory transport that notes when each message id is handed to the broker."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.published: dict[str, float] = {}

    async def publish_many(self, messages: Sequence[tuple[str, envelope.WireMessage]]) -> list[Exception | None]:
        now = time.perf_counter()
        for _, message in messages:
            self.published.setdefault(message.message_id or "", now)
        return [None] * len(messages)


async def wake_latency(url: str, design: str, writers: int) -> tuple[float, float, float]:
    """(transactions/s, p50 ms, p99 ms) of ``writers`` concurrent writers, each one ``Outbox.add`` per transaction.

    The relay runs on a Database object of its own, so no in-process signal
    reaches it: only NOTIFY (or its poll) wakes it, as in a separate process.
    """
    admin = await asyncpg.connect(dsn(url))
    try:
        await admin.execute("TRUNCATE outbox")
        if design == "trigger NOTIFY":
            await admin.execute(
                "CREATE OR REPLACE TRIGGER conveyor_outbox_inserted AFTER INSERT ON outbox "
                "FOR EACH STATEMENT EXECUTE FUNCTION conveyor_outbox_notify()"
            )
        else:
            await admin.execute("DROP TRIGGER IF EXISTS conveyor_outbox_inserted ON outbox")
    finally:
        await admin.close()
    writer_db = Database(url, pool_size=writers + 2)
    relay_db = Database(url)
    transport = _Stamping(f"memory://{unique('wake')}")
    await transport.connect()
    polling = design == "poll 10 ms"
    store = SqlOutboxStore(relay_db, listen=not polling)
    options = RelayOptions(poll_interval=0.01 if polling else 1.0, min_idle=0.01 if polling else 0.1)
    relay = Relay(store, transport, options=options)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    outbox = Outbox(source="bench")
    committed: dict[str, float] = {}
    notify = sa.text("SELECT pg_notify('conveyor_outbox', '')")

    async def write(count: int) -> None:
        for _ in range(count):
            async with writer_db.transaction() as session:
                event = await outbox.add(session, "bench.wake", PAYLOAD)
                if design == "pg_notify per transaction":
                    await session.execute(notify)
            committed[event.id] = time.perf_counter()

    try:
        await store.wait(0)  # LISTEN is up before the clock starts
        await asyncio.sleep(0.2)
        count = WRITER_COUNTS[writers]
        started = time.perf_counter()
        await asyncio.gather(*(write(count) for _ in range(writers)))
        rate = writers * count / (time.perf_counter() - started)
        deadline = time.monotonic() + 30
        while len(transport.published) < len(committed) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await running
        await store.close()
        await transport.close()
        await writer_db.close()
        await relay_db.close()
    latencies = sorted(max(transport.published.get(i, float("inf")) - t, 0.0) * 1000 for i, t in committed.items())
    return rate, latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


async def notify_study(runs: int) -> None:
    """Print commit throughput and commit-to-publish latency (medians of ``runs``) per wake-up design."""
    print("| design | writers | commits/s | commit-to-publish p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    async with scratch_database() as url:
        for writers in WRITER_COUNTS:
            for design in WAKE_DESIGNS:
                figures = [await wake_latency(url, design, writers) for _ in range(runs)]
                rate, p50, p99 = (statistics.median(f[i] for f in figures) for i in range(3))
                print(f"| {design} | {writers} | {rate:,.0f} | {p50:.1f} | {p99:.1f} |", flush=True)


async def main(runs: int, only: str | None) -> None:
    outcomes = await harness.run_suite(suite, runs, only)
    print()
    print(harness.format_table(outcomes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=None)
    parser.add_argument("--latency", action="store_true", help="print the wake-up designs' latency table only")
    args = parser.parse_args()
    asyncio.run(notify_study(args.runs) if args.latency else main(args.runs, args.only))
