"""The hand-written outbox baselines, and the older outbox and relay figures.

The persistence rows (:mod:`bench.suite_persistence`) compare Conveyor with
what a careful user would write by hand with the same clients, on the same
event loop; those hand-written pieces are here:

* :func:`event_headers`: the outbox ``headers`` Conveyor writes for a JSON
  event (``ce-*`` attributes and ``content-type``, as JSON text), built with a
  dict and orjson, so a raw row is the same row, byte for byte in shape;
* :func:`relay_by_hand`: the relay loop every outbox article shows: in one
  transaction, claim the oldest unsent rows (``FOR UPDATE SKIP LOCKED``),
  publish them all, mark them sent with one ``UPDATE ... WHERE id = ANY(ids)``,
  commit; no overlap between the database and the broker;
* :class:`RabbitByHand` (aiormq, publisher confirms, ``mandatory``, a sliding
  window of publishes awaiting their confirm) and :class:`NatsByHand` (nats-py's
  core client: each batch published with reply subjects, its PubAcks matched on one
  subscription) put on the wire what Conveyor's
  RabbitMQ and NATS transports put there for a relayed row: same exchange or
  subject, body, headers (``ce-`` becomes ``cloudEvents_`` on AMQP), content
  type, message id (``Nats-Msg-Id`` on NATS), ``conveyor-key`` for keyed rows.

Run alone (``.venv/bin/python -m bench.outbox_relay``; PostgreSQL at
``CONVEYOR_BENCH_POSTGRES_URL``, default
postgresql+asyncpg://postgres@127.0.0.1:5432/test; a scratch database is
created and dropped), it prints:

* outbox insert rows/s through ``Outbox.add`` in transactions of 1 and 100 rows,
  on SQLite and PostgreSQL, next to raw asyncpg inserts of the same rows;
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import asyncpg
import nats
import orjson
import sqlalchemy as sa
from conveyor import envelope, ports, transports
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import Collector
from conveyor.transports.memory import MemoryTransport
from nats.aio.client import Client as NatsClient
from pamqp.commands import Basic
from sqlalchemy.engine import make_url

from bench import raw_clients
from event_store import Database, Outbox, SqlOutboxStore, direct, upgrade

PG_URL = os.environ.get("CONVEYOR_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
TOPIC = "bench.outbox"
PAYLOAD = {"order_id": "o-123", "total_cents": 4200, "note": "x" * 200}

# -- the hand-written baselines ----------------------------------------------------------------------------------------

OUTBOX_INSERT = "INSERT INTO outbox (message_id, topic, partition_key, headers, body) VALUES ($1, $2, $3, $4, $5)"
"""The outbox row, as a user inserts it with asyncpg (the columns Conveyor writes; the rest have defaults)."""
CLAIM = (
    "SELECT id, message_id, topic, partition_key, headers, body FROM outbox "
    "WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
)
MARK = "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])"
WINDOW = 256
"""Publishes awaiting their confirm at once, on both sides (Conveyor's relay: ``RelayOptions.max_in_flight``)."""
BATCH = 1000
"""Rows per claim, on both sides (Conveyor's relay: ``RelayOptions.batch_size``)."""
_AMQP_PREFIX = envelope.AMQP_PREFIX
_KEY_HEADER = "conveyor-key"


def event_headers(
    message_id: str, event_type: str, *, source: str, key: str | None = None, cause: str | None = None
) -> str:
    """The outbox ``headers`` (JSON text) of a JSON event, as Conveyor writes them, built by hand.

    Args:
        message_id: ``ce-id`` (also the row's ``message_id``).
        event_type: ``ce-type``.
        source: ``ce-source``.
        key: ``ce-partitionkey``, if the event has an ordering key.
        cause: the id of the message being handled: ``ce-correlationid`` and
            ``ce-causationid``, as a handler's publish carries them.
    """
    headers = {
        "ce-id": message_id,
        "ce-source": source,
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    if key is not None:
        headers["ce-partitionkey"] = key
    if cause is not None:
        headers["ce-correlationid"] = cause
        headers["ce-causationid"] = cause
    headers["content-type"] = "application/json"
    return orjson.dumps(headers).decode()


async def fill_outbox(dsn: str, topic: str, rows: int, *, keys: int = 50) -> None:
    """Commit ``rows`` outbox rows of 1 KB to ``topic``, half keyed over ``keys`` keys (Conveyor's rows; not timed).

    The rows are :meth:`Outbox.build`'s envelopes in the columns ``Outbox.add``
    writes, inserted 1,000 to a pipelined ``executemany``.
    """
    outbox = Outbox(source="bench")
    body = {"pad": "x" * 1000}
    connection = await asyncpg.connect(dsn)
    try:
        for start in range(0, rows, BATCH):
            events = (
                outbox.build(topic, body, key=f"k{n % keys}" if n % 2 else None)
                for n in range(start, min(start + BATCH, rows))
            )
            async with connection.transaction():
                await connection.executemany(OUTBOX_INSERT, [direct.outbox_params(topic, e) for e in events])
    finally:
        await connection.close()


Publish = Callable[[Sequence[asyncpg.Record]], Awaitable[None]]
"""Publishes claimed rows (``id, message_id, topic, partition_key, headers, body``); returns once all are confirmed."""


async def relay_by_hand(connection: asyncpg.Connection, publish: Publish, batch: int = BATCH) -> int:
    """Drain the outbox the way a hand-written relay does; return the rows sent.

    Each round is one transaction: claim the oldest ``batch`` unsent rows
    (locked, skipping rows another relay holds), publish them, mark them sent
    with one ``UPDATE``, commit. Until a claim comes back empty.
    """
    sent = 0
    while True:
        async with connection.transaction():
            rows = await connection.fetch(CLAIM, batch)
            if not rows:
                return sent
            await publish(rows)
            await connection.execute(MARK, [row["id"] for row in rows])
        sent += len(rows)


async def _windowed(operations: Iterable[Awaitable[Any]], window: int) -> None:
    """Await ``operations`` with at most ``window`` in flight (a sliding window); errors propagate."""
    slots = asyncio.Semaphore(window)

    async def one(operation: Awaitable[Any]) -> None:
        try:
            await operation
        finally:
            slots.release()

    running = []
    for operation in operations:
        await slots.acquire()
        running.append(asyncio.ensure_future(one(operation)))
    await asyncio.gather(*running)


class RabbitByHand:
    """Publishes outbox rows with aiormq as Conveyor's RabbitMQ transport does: same frames, confirmed.

    To the durable topic exchange ``exchange`` with the topic as routing key,
    ``mandatory``, persistent, ``message_id`` set, ``content-type`` as the
    content type property and the other headers renamed ``ce-`` ->
    ``cloudEvents_``, plus ``conveyor-key`` for keyed rows.
    """

    def __init__(self, connection: aiormq.abc.AbstractConnection, channel: aiormq.abc.AbstractChannel,
                 exchange: str, window: int) -> None:  # fmt: skip
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._window = window

    @classmethod
    async def connect(cls, url: str, exchange: str = "conveyor", window: int = WINDOW) -> RabbitByHand:
        """Connect and open a channel with publisher confirms."""
        connection = await aiormq.connect(url)
        return cls(connection, await connection.channel(publisher_confirms=True), exchange, window)

    async def publish(self, rows: Sequence[asyncpg.Record]) -> None:
        """Publish ``rows``, at most ``window`` awaiting their confirm; return once all are confirmed.

        Raises:
            aiormq.exceptions.DeliveryError: a message was nacked or returned.
        """
        await _windowed((self._publish(row) for row in rows), self._window)

    async def _publish(self, row: asyncpg.Record) -> None:
        headers: dict[str, Any] = orjson.loads(row["headers"])
        content_type = headers.pop("content-type", None)
        table = {(_AMQP_PREFIX + k[3:] if k.startswith("ce-") else k): v for k, v in headers.items()}
        if row["partition_key"] is not None:
            table[_KEY_HEADER] = row["partition_key"]
        properties = Basic.Properties(
            content_type=content_type, headers=table, delivery_mode=2, message_id=row["message_id"]
        )
        await self._channel.basic_publish(
            row["body"], exchange=self._exchange, routing_key=row["topic"], properties=properties, mandatory=True
        )

    async def close(self) -> None:
        """Close the connection."""
        await self._connection.close()


class NatsByHand:
    """Publishes outbox rows to JetStream pipelined on one connection, the fastest fair nats-py pattern.

    To the subject ``<prefix>.<topic>`` with the row's headers, ``Nats-Msg-Id``
    (the message id) and ``conveyor-key`` for keyed rows. Each message goes out
    with a reply subject ``<inbox>.<n>``; the PubAcks come to one subscription on
    ``<inbox>.*`` and resolve their futures (an error in a PubAck fails it), as
    ``conveyor.transports.nats_publish`` does: about 1.4x nats-py's
    ``js.publish_async`` here. A batch waits for all its PubAcks.
    """

    def __init__(self, client: NatsClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._inbox = f"{client.new_inbox()}."
        self._answers: dict[str, asyncio.Future[None]] = {}
        self._sent = 0
        self._replies: Any = None

    @classmethod
    async def connect(cls, url: str, prefix: str = "conveyor") -> NatsByHand:
        """Connect and subscribe to the PubAcks."""
        relay = cls(await nats.connect(url), prefix)
        relay._replies = await relay._client.subscribe(f"{relay._inbox}*", cb=relay._on_reply)
        return relay

    async def _on_reply(self, msg: Any) -> None:
        raw_clients.settle_pub_ack(self._answers, msg)

    async def publish(self, rows: Sequence[asyncpg.Record]) -> None:
        """Publish ``rows`` pipelined; return once every PubAck came.

        Raises:
            RuntimeError: the stream refused a message.
        """
        loop = asyncio.get_running_loop()
        acks = []
        for row in rows:
            headers: dict[str, str] = orjson.loads(row["headers"])
            headers["Nats-Msg-Id"] = row["message_id"]
            if row["partition_key"] is not None:
                headers[_KEY_HEADER] = row["partition_key"]
            self._sent += 1
            reply = f"{self._inbox}{self._sent:x}"
            future = self._answers[reply] = loop.create_future()
            acks.append(future)
            await self._client.publish(f"{self._prefix}.{row['topic']}", row["body"], reply=reply, headers=headers)
        await asyncio.gather(*acks)

    async def close(self) -> None:
        """Drain and close the connection."""
        await self._client.close()


# -- the older figures -------------------------------------------------------------------------------------------------


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
    """Rows/s inserting the same rows with asyncpg directly (one INSERT per row, headers built per row)."""
    connection = await asyncpg.connect(_dsn(url))

    async def work() -> None:
        for _ in range(rows // batch):
            async with connection.transaction():
                for _ in range(batch):
                    message_id = str(uuid.uuid4())
                    headers = event_headers(message_id, TOPIC, source="bench")
                    await connection.execute(OUTBOX_INSERT, message_id, TOPIC, None, headers, orjson.dumps(PAYLOAD))

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
