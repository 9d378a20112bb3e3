"""Fire precision of cron jobs: delay from the scheduled (UTC) fire time to the job handler's start.

Runs scheduler replicas (1 and 3), a relay and a worker in this process over
the memory broker and a fresh database (PostgreSQL with LISTEN/NOTIFY, or
SQLite), with a one-second schedule, and prints p50/p99/max of the delay.

    .venv/bin/python bench/scheduler_precision.py --fires 20 --database postgres
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "support"))

import databases
from conveyor import Context, Registry, every
from conveyor.runtime import app, scheduler
from conveyor.runtime.relay import Relay
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.transports.memory import MemoryTransport

from event_store import Database
from event_store.outbox_store import SqlOutboxStore


async def measure(kind: str, replicas: int, fires: int) -> list[float]:
    url = databases.create(kind)
    database = Database(url)
    delays: list[float] = []
    done = asyncio.Event()

    @every(timedelta(seconds=1), name=unique("bench"), overlap="allow")
    async def job(ctx: Context) -> None:
        fired = datetime.fromisoformat(ctx.message.json()["fire_time"])
        delays.append((datetime.now(UTC) - fired).total_seconds())
        if len(delays) >= fires:
            done.set()

    registry = Registry.of(job)
    transport = MemoryTransport(f"memory://{unique('bench')}")
    await transport.connect()
    stores = app.stores_for(database, "bench")
    worker = Worker(
        scheduler.job_handlers(registry.schedules, stores), transport, source="bench", transactions=stores.units
    )
    await worker.start()
    store = SqlOutboxStore(database)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(Relay(store, transport).run(stop))]
    tasks += [
        asyncio.create_task(scheduler.Scheduler(registry.schedules, stores, source="bench").run(stop))
        for _ in range(replicas)
    ]
    try:
        await asyncio.wait_for(done.wait(), fires * 2 + 10)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await worker.stop(5)
        await transport.close()
        await store.close()
        await database.close()
        databases.drop(url)
    return delays[:fires]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(kinds: list[str], fires: int) -> None:
    print(f"delay from fire time to job start, {fires} fires of a one-second schedule, milliseconds")
    print(f"{'database':<10}{'replicas':>9}{'p50':>9}{'p99':>9}{'max':>9}")
    for kind in kinds:
        for replicas in (1, 3):
            delays = [d * 1000 for d in await measure(kind, replicas, fires)]
            print(f"{kind:<10}{replicas:>9}{statistics.median(delays):>9.1f}"
                  f"{percentile(delays, 0.99):>9.1f}{max(delays):>9.1f}")  # fmt: skip
    databases.drop_templates()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fires", type=int, default=20)
    parser.add_argument("--database", choices=["postgres", "sqlite", "both"], default="both")
    args = parser.parse_args()
    asyncio.run(main(["postgres", "sqlite"] if args.database == "both" else [args.database], args.fires))
