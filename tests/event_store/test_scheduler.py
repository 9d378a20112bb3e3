"""The scheduler on SQLite and PostgreSQL: misfire policies, skewed clocks, pause/resume, trigger, delays."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import prometheus_client
import pytest
import sqlalchemy as sa
from conveyor import Context, envelope, ports, stores
from conveyor.runtime import app, scheduler
from conveyor.runtime.relay import Relay, RelayOptions, wire_message
from conveyor.runtime.worker import Worker
from conveyor.scheduling.schedules import Schedule, every
from conveyor.testing import Collector, unique, wait_for
from conveyor.transports.memory import MemoryTransport
from relay_helpers import wait_until

from event_store import Database, claims, models, schedule_at
from event_store.outbox_store import SqlOutboxStore


def each_second(misfire: str = "coalesce", overlap: str = "allow") -> Schedule:
    @every(timedelta(seconds=1), name=unique("tick"), misfire=misfire, overlap=overlap)  # type: ignore[arg-type]
    def job() -> None: ...

    return job.__conveyor_schedule__  # type: ignore[attr-defined, no-any-return]


async def db_now(db: Database) -> datetime:
    async with db.transaction(readonly=True) as session:
        return await claims.database_now(session)


async def claim_rows(db: Database, schedule: Schedule) -> list[claims.Run]:
    async with db.transaction(readonly=True) as session:
        return sorted(await claims.history(session, schedule.name, limit=10_000), key=lambda r: r.fire_time)


async def enqueued(db: Database, schedule: Schedule) -> int:
    async with db.transaction(readonly=True) as session:
        query = sa.select(sa.func.count()).select_from(models.outbox).where(models.outbox.c.topic == schedule.topic)
        return int((await session.execute(query)).scalar_one())


async def until_due(db: Database, fire: datetime, timeout: float = 10.0) -> None:
    """Wait until the database clock (which decides what is due) reaches ``fire``."""
    deadline = time.monotonic() + timeout
    while (now := await db_now(db)) < fire:
        assert time.monotonic() < deadline, f"the database clock is at {now}, not yet {fire}, after {timeout}s"
        await asyncio.sleep(min((fire - now).total_seconds(), 0.05))


def next_second(moment: datetime) -> datetime:
    """The first whole second after ``moment``: a fire time of a one-second schedule."""
    return moment.replace(microsecond=0) + timedelta(seconds=1)


class SkewedClock:
    def __init__(self, seconds: float) -> None:
        self.offset = timedelta(seconds=seconds)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.parametrize(("policy", "runs"), [("skip", 0), ("coalesce", 1), ("all", 5)])
async def test_downtime_across_five_fires_follows_the_misfire_policy(db: Database, policy: str, runs: int) -> None:
    schedule = each_second(misfire=policy)
    last = (await db_now(db)).replace(microsecond=0) - timedelta(seconds=6)  # fires last+1..last+5 are missed
    async with db.transaction() as session:
        await claims.claim(session, schedule.name, last, status=claims.SUCCEEDED, claimed_by="before-downtime")
    await scheduler.Scheduler([schedule], app.stores_for(db, "t"), source="t").tick()
    rows = await claim_rows(db, schedule)
    missed = [r for r in rows if last < r.fire_time <= last + timedelta(seconds=5)]
    assert sum(r.status == claims.CLAIMED for r in missed) == runs
    # A fire that came due while the tick ran is on time or (on a slow machine, found past the grace) skipped
    # too: whatever the timing, exactly the claimed fires are enqueued.
    on_time = [r for r in rows if r.fire_time > last + timedelta(seconds=5) and r.status == claims.CLAIMED]
    assert await enqueued(db, schedule) == runs + len(on_time)


async def test_skewed_host_clocks_neither_fire_early_nor_twice(db: Database) -> None:
    schedule = each_second()
    fast = scheduler.Scheduler([schedule], app.stores_for(db, "t"), source="t", clock=SkewedClock(+30))
    slow = scheduler.Scheduler([schedule], app.stores_for(db, "t"), source="t", clock=SkewedClock(-30))
    deadline = time.monotonic() + 10
    while len(rows := await claim_rows(db, schedule)) < 3:  # both replicas tick through three fires
        assert time.monotonic() < deadline, f"only {len(rows)} fires claimed after 10s"
        await asyncio.gather(fast.tick(), slow.tick())
        await asyncio.sleep(0.05)  # the tick interval of the two replicas
    fires = [r.fire_time for r in rows]
    assert len(fires) >= 3 and len(set(fires)) == len(fires)
    assert all(r.claimed_at >= r.fire_time for r in rows), "a fire was claimed before its time"
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(fires)), fires
    assert await enqueued(db, schedule) == len(rows)
    assert round(fast.skew) == 30 and round(slow.skew) == -30


async def test_paused_schedule_is_not_fired_by_any_replica_and_resume_skips_the_pause(db: Database) -> None:
    schedule = each_second(misfire="all")
    replica = scheduler.Scheduler([schedule], app.stores_for(db, "t"), source="t")
    await replica.tick()
    async with db.transaction() as session:
        await claims.set_paused(session, schedule.name, True)
    before = len(await claim_rows(db, schedule))
    await until_due(db, next_second(await db_now(db)) + timedelta(seconds=1))  # two fires due while paused
    await replica.tick()
    assert len(await claim_rows(db, schedule)) == before
    async with db.transaction() as session:
        await claims.set_paused(session, schedule.name, False)
    resumed = await db_now(db)
    await until_due(db, next_second(resumed))  # a fire due after the resume
    await replica.tick()
    after = await claim_rows(db, schedule)
    assert len(after) > before
    assert all(r.fire_time > resumed - timedelta(seconds=1) for r in after[before:]), "paused fires were run"


async def test_trigger_enqueues_one_manual_run(db: Database) -> None:
    schedule = each_second()
    run_id = await scheduler.trigger_now(app.stores_for(db, "t"), schedule, "t")
    (row,) = await claim_rows(db, schedule)
    assert (row.id, row.status, row.claimed_by) == (run_id, claims.CLAIMED, "manual")
    assert await enqueued(db, schedule) == 1


async def test_overlap_skip_does_not_start_a_fire_while_the_last_run_is_going(db: Database) -> None:
    schedule = each_second(overlap="skip")
    replica = scheduler.Scheduler([schedule], app.stores_for(db, "t"), source="t")
    await replica.tick()
    await until_due(db, next_second(await db_now(db)))  # the next fire
    await replica.tick()  # the first run was claimed and never finished: still "running"
    statuses = [r.status for r in await claim_rows(db, schedule)]
    assert statuses[0] == claims.CLAIMED and claims.SKIPPED in statuses[1:]


class _DueWatchingStore(SqlOutboxStore):
    """Tells when a relay has seen a row that is not due yet."""

    saw_pending = False

    async def next_due_in(self) -> float | None:
        due_in = await super().next_due_in()
        self.saw_pending = self.saw_pending or (due_in is not None and due_in > 0)
        return due_in


async def test_delayed_message_is_delivered_on_time_across_a_relay_restart(db: Database) -> None:
    transport = MemoryTransport(f"memory://{unique('delay')}")
    await transport.connect()
    topic = unique("later")
    sub = ports.Subscription(name=unique("sub"), topic=topic)
    await transport.declare([topic], [sub])
    received = Collector()
    await transport.subscribe(sub, received)
    store = _DueWatchingStore(db, listen=False)
    options = RelayOptions(poll_interval=0.1)

    first_stop = asyncio.Event()
    first = asyncio.create_task(Relay(store, transport, options=options).run(first_stop))
    async with db.transaction() as session:
        due = await claims.database_now(session) + timedelta(seconds=2)
        await schedule_at(session, topic, {"n": 1}, at=due)
    await wait_for(lambda: store.saw_pending, 10, "the first relay to see the message pending")
    first_stop.set()
    await first  # the relay stops before the message is due

    second_stop = asyncio.Event()
    second = asyncio.create_task(Relay(store, transport, options=options).run(second_stop))
    try:
        (got,) = await received.wait(1, timeout=10)
        delivered = await db_now(db)
    finally:
        second_stop.set()
        await second
        await store.close()
        await transport.close()
    assert got.message.body == b'{"n":1}'
    assert due <= delivered <= due + timedelta(seconds=1), (due, delivered)


def finished(handler: str) -> float:
    """Deliveries the handler settled for good (acknowledged: never redelivered), from the worker's metrics."""
    return sum(
        prometheus_client.REGISTRY.get_sample_value("conveyor_messages_total", {"handler": handler, "outcome": o})
        or 0.0
        for o in ("succeeded", "dead_lettered", "duplicate")
    )


def relay_wire(row: sa.Row[Any], prefix: str) -> envelope.WireMessage:
    """The message the relay would publish for an outbox row."""
    message = stores.OutboxMessage(
        id=row.id, message_id=row.message_id, topic=row.topic, key=row.partition_key, headers=row.headers,
        body=row.body, attempts=row.attempts, created_at=row.created_at,
    )  # fmt: skip
    return wire_message(message, prefix)


async def test_a_job_message_delivered_twice_runs_the_job_once(db: Database) -> None:
    runs: list[str] = []

    @every(timedelta(hours=1), name=unique("once"))
    async def job(ctx: Context) -> None:
        runs.append(ctx.message.id)

    schedule: Schedule = job.__conveyor_schedule__  # type: ignore[attr-defined]
    stores = app.stores_for(db, "t")
    run_id = await scheduler.trigger_now(stores, schedule, "t")
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(models.outbox).where(models.outbox.c.topic == schedule.topic))).one()
    transport = MemoryTransport(f"memory://{unique('jobs')}")
    await transport.connect()
    handlers = scheduler.job_handlers([schedule], stores)
    worker = Worker(handlers, transport, source="t", transactions=stores.units)
    await worker.start()
    wire = relay_wire(row, transport.binary_prefix)
    try:
        await transport.publish(schedule.topic, wire)
        await wait_for(lambda: len(runs) == 1, 10, "the first run")
        await transport.publish(schedule.topic, wire)  # a duplicate (a relay crash between publish and mark)
        await wait_for(lambda: finished(handlers[0].name) == 2, 10, "the duplicate to be settled")
        assert await worker.stop(5)
    finally:
        await transport.close()
    (claim,) = await claim_rows(db, schedule)
    assert (runs, claim.id, claim.status) == ([row.message_id], run_id, claims.SUCCEEDED)


async def test_a_failed_run_never_overwrites_a_success(db: Database) -> None:
    schedule = each_second()
    stores = app.stores_for(db, "t")
    run_id = await scheduler.trigger_now(stores, schedule, "t")
    async with db.transaction() as session:
        assert await claims.start(session, run_id)
        await claims.finish(session, run_id, "succeeded")
        started_again = await claims.start(session, run_id)
        await claims.finish(session, run_id, "failed", error="a late duplicate failed")
    (claim,) = await claim_rows(db, schedule)
    assert (started_again, claim.status, claim.error) == (False, claims.SUCCEEDED, None)


async def test_resuming_a_schedule_that_is_not_paused_keeps_its_missed_fires(db: Database) -> None:
    schedule = each_second(misfire="all")
    replica = scheduler.Scheduler([schedule], app.stores_for(db, "t"), source="t")
    await replica.tick()
    before = len(await claim_rows(db, schedule))
    await until_due(db, next_second(await db_now(db)) + timedelta(seconds=1))  # two fires missed (no tick)
    async with db.transaction() as session:
        await claims.set_paused(session, schedule.name, False)  # an operator resumes an active schedule
    await replica.tick()
    assert len(await claim_rows(db, schedule)) >= before + 2


async def test_a_job_that_fails_inside_its_transaction_is_marked_failed_at_once(db: Database) -> None:
    @every(timedelta(hours=1), name=unique("fails"), max_attempts=1)
    async def job(ctx: Context) -> None:
        async with ctx.transaction():  # on SQLite the attempt now holds the write lock
            raise RuntimeError("the job's own failure")

    schedule: Schedule = job.__conveyor_schedule__  # type: ignore[attr-defined]
    stores = app.stores_for(db, "t")
    await scheduler.trigger_now(stores, schedule, "t")
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(models.outbox).where(models.outbox.c.topic == schedule.topic))).one()
    transport = MemoryTransport(f"memory://{unique('jobs')}")
    await transport.connect()
    worker = Worker(scheduler.job_handlers([schedule], stores), transport, source="t", transactions=stores.units)
    await worker.start()
    try:
        await transport.publish(schedule.topic, relay_wire(row, transport.binary_prefix))

        async def marked_failed() -> bool:
            (claim,) = await claim_rows(db, schedule)
            return claim.status == claims.FAILED

        # Well before SQLite's 30 s busy timeout: the failure mark must not wait for the attempt's own lock.
        await wait_until(marked_failed, 5, "the run marked failed")
        assert await worker.stop(5)
    finally:
        await transport.close()
