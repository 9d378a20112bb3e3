"""Completed three-step sagas per second on PostgreSQL, next to a plain transactional handler in the same run.

One process: the memory transport, a worker and the outbox relay on a fresh
migrated PostgreSQL database per run (cloned from a template migrated once).

* saga: ``--count`` sagas whose three steps each send a command (with a reply
  timeout, as the example's do) to a trivial transactional participant that
  replies in its transaction. One saga is 7 transactional handler runs (the
  start, three participants, three replies) and 7 relay hops.
* plain: ``--count`` messages to a transactional handler doing one insert and
  one outbox publish: 1 handler run and 2 relay hops per message.

The starting messages are committed to the outbox before the worker and the
relay start; a run is timed from their start until every saga is completed
(every plain message handled and its publish relayed). The cases are
interleaved for ``--rounds`` rounds; medians are printed, with the ratio
(the saga rate over the plain rate) and the handler runs per second of each.

    .venv/bin/python bench/saga_throughput.py --count 300 --rounds 3

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
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pydantic
import sqlalchemy as sa
from conveyor import Context, Saga, registry
from conveyor.runtime import app
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.transports.memory import MemoryTransport
from sqlalchemy.engine import make_url

from event_store import Database, upgrade

PG_URL = os.environ.get("CONVEYOR_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
SAGA_RUNS, PLAIN_RUNS = 7, 1
"""Transactional handler runs per saga and per plain message."""


class Order(pydantic.BaseModel):
    order_id: str
    total_cents: int
    receipt: str | None = None


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(_dsn(PG_URL))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _url(name: str) -> str:
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


async def template() -> str:
    name = f"conveyor_bench_tmpl_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    await upgrade(_url(name))
    async with _open(_url(name)) as db, db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE effects (id VARCHAR(64) PRIMARY KEY)"))
    return name


@contextlib.asynccontextmanager
async def _open(url: str) -> AsyncIterator[Database]:
    db = Database(url)
    try:
        yield db
    finally:
        await db.close()


def saga_app(prefix: str) -> tuple[Saga[Order], list[Any]]:
    saga = Saga(f"{prefix}.checkout", Order, id=lambda order: order.order_id)
    participants = []
    for step in ("reserve", "charge", "ship"):
        topic = f"{prefix}.{step}"

        @saga.step(send=topic, timeout=60, name=step)
        def command(order: Order) -> dict[str, Any]:
            return {"order_id": order.order_id, "total_cents": order.total_cents}

        @registry.on(topic, name=f"{prefix}.{step}-handler", transactional=True)
        async def participant(command: dict[str, Any], ctx: Context) -> None:
            ctx.reply({"receipt": "r-" + command["order_id"]})

        participants.append(participant)

    @saga.steps[1].replied
    def charged(order: Order, reply: dict[str, Any]) -> None:
        order.receipt = reply["receipt"]

    return saga, participants


def plain_app(prefix: str) -> Any:
    @registry.on(f"{prefix}.orders", name=f"{prefix}.record", transactional=True)
    async def record(order: Order, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.session.execute(sa.text("INSERT INTO effects (id) VALUES (:id)"), {"id": order.order_id})
            ctx.publish(f"{prefix}.recorded", order, key=order.order_id)

    return record


async def run_case(tmpl: str, count: int, case: str) -> float:
    """Messages (sagas) per second of one run of ``case`` on a fresh database."""
    name = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{tmpl}"')
    prefix = unique("bench")
    try:
        async with _open(_url(name)) as db:
            stores = app.stores_for(db, "bench")
            orders = [Order(order_id=f"o-{n}", total_cents=1000 + n) for n in range(count)]
            if case == "saga":
                saga, participants = saga_app(prefix)
                handlers = registry.Registry.of(saga, *participants).handlers
                done_sql = "SELECT count(*) FROM sagas WHERE status = 'completed'"
                async with db.transaction() as session:
                    for order in orders:
                        await stores.outbox.add(session, saga.topic, saga.start_event(order))
            else:
                handlers = registry.Registry.of(plain_app(prefix)).handlers
                done_sql = "SELECT count(*) FROM effects WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE sent_at IS NULL)"
                async with db.transaction() as session:
                    for order in orders:
                        await stores.outbox.add(session, f"{prefix}.orders", order, key=order.order_id)
            return await _timed(db, stores, handlers, count, done_sql)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _timed(db: Database, stores: Any, handlers: list[Any], count: int, done_sql: str) -> float:
    transport = MemoryTransport(f"memory://{unique('bench')}")
    await transport.connect()
    worker = Worker(handlers, transport, source="bench", transactions=stores.units)
    await worker.declare()
    store = stores.relay_store()
    relay = Relay(store, transport, options=RelayOptions(batch_size=200))
    stop = asyncio.Event()
    started = time.perf_counter()
    await worker.start()
    relaying = asyncio.create_task(relay.run(stop))
    try:
        while await _scalar(db, done_sql) < count:
            if relaying.done():
                relaying.result()  # the relay died: raise its error
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await relaying
        await worker.stop(5)
        await store.close()
        await transport.close()
    return count / elapsed


async def _scalar(db: Database, sql: str) -> int:
    async with db.transaction(readonly=True) as session:
        return int((await session.execute(sa.text(sql))).scalar_one())


async def main(count: int, rounds: int) -> None:
    tmpl = await template()
    rates: dict[str, list[float]] = {"saga": [], "plain": []}
    try:
        for _ in range(rounds):  # interleaved: a disturbance hits both cases alike
            for case in rates:
                rates[case].append(await run_case(tmpl, count, case))
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{tmpl}" WITH (FORCE)')
    saga, plain = statistics.median(rates["saga"]), statistics.median(rates["plain"])
    print(f"{count} per run on PostgreSQL, memory transport, concurrency 16; median of {rounds} interleaved runs")
    print(f"{'case':<38}{'per s':>10}{'handler runs/s':>16}   runs")
    print(f"{'three-step sagas completed':<38}{saga:>10,.1f}{saga * SAGA_RUNS:>16,.0f}   "
          + " ".join(f"{r:,.1f}" for r in rates["saga"]))  # fmt: skip
    print(f"{'plain handler (insert + publish)':<38}{plain:>10,.1f}{plain * PLAIN_RUNS:>16,.0f}   "
          + " ".join(f"{r:,.1f}" for r in rates["plain"]))  # fmt: skip
    print(f"ratio saga/plain {saga / plain:.3f} (per handler run {saga * SAGA_RUNS / plain:.2f})")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=_positive, default=300)
    parser.add_argument("--rounds", type=_positive, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.rounds))
