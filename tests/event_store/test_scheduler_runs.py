"""Deliveries of one cron run's job message, on SQLite and PostgreSQL: the job runs once per fire.

A job message can be delivered again while its first delivery still runs the
job (a broker redelivery after a lost channel, a duplicate publish), or after
the worker running it died. Each test keeps a ledger of the job's runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import prometheus_client
import pytest
import sqlalchemy as sa
from conveyor import Context, errors, persistence, stores
from conveyor.runtime import app, scheduler
from conveyor.runtime.relay import wire_message
from conveyor.runtime.worker import Worker
from conveyor.scheduling.schedules import Schedule, every
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport

from event_store import Database, claims, models

WAITING = "waits for it"
"""Part of the log line of a delivery that found the run started by a live attempt."""


def outcome(handler: str, name: str) -> float:
    """How many deliveries ``handler`` settled with ``name`` (``succeeded``, ``duplicate``, ...)."""
    value = prometheus_client.REGISTRY.get_sample_value(
        "conveyor_messages_total", {"handler": handler, "outcome": name}
    )
    return value or 0.0


def settled(handler: str) -> float:
    """Deliveries ``handler`` settled for good (acknowledged: never redelivered)."""
    return sum(outcome(handler, name) for name in ("succeeded", "dead_lettered", "duplicate"))


async def job_wire(db: Database, schedule: Schedule, prefix: str) -> Any:
    """The job message the relay would publish for the schedule's only outbox row."""
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(models.outbox).where(models.outbox.c.topic == schedule.topic))).one()
    message = stores.OutboxMessage(
        id=row.id, message_id=row.message_id, topic=row.topic, key=row.partition_key, headers=row.headers,
        body=row.body, attempts=row.attempts, created_at=row.created_at,
    )  # fmt: skip
    return wire_message(message, prefix)


async def the_run(db: Database, schedule: Schedule) -> claims.Run:
    async with db.transaction(readonly=True) as session:
        (run,) = await claims.history(session, schedule.name)
    return run


class Ledger:
    """The job's runs, and a gate that holds each run until a second delivery showed what it does.

    A run passes the gate once a second run started too (the defect) or a
    delivery logged that it waits for the running attempt (the fix), so the
    deliveries overlap for certain, whichever code runs.
    """

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.runs: list[tuple[str, float]] = []
        self._caplog = caplog

    def waiting(self) -> bool:
        return any(WAITING in record.getMessage() for record in self._caplog.records)

    async def run(self, who: str, *, gate: bool = True, timeout: float = 10.0) -> None:
        self.runs.append((who, time.monotonic()))
        if gate:
            with contextlib.suppress(AssertionError):  # no second delivery showed up: let the run go on
                await wait_for(lambda: len(self.runs) > 1 or self.waiting(), timeout, "a second delivery")

    def who(self) -> list[str]:
        return [who for who, _ in self.runs]


def declare(job: Callable[[Context], Any], *, timeout: float = 10.0) -> Schedule:
    decorated = every(timedelta(hours=1), name=unique("run"), timeout=timeout)(job)
    return decorated.__conveyor_schedule__  # type: ignore[attr-defined, no-any-return]


class SeveredStore:
    """A worker's schedule store whose database link can be cut, as a crash would cut it."""

    def __init__(self, store: persistence.ScheduleStore) -> None:
        self._store = store
        self.severed = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.severed:
                raise errors.StoreUnavailable("the worker crashed")
            return await method(*args, **kwargs)

        return call


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="conveyor.scheduler")
    return caplog


async def test_two_concurrent_deliveries_of_a_job_message_run_the_job_once(
    db: Database, caplog_info: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(caplog_info)

    async def job(ctx: Context) -> None:
        await ledger.run(ctx.message.id)

    schedule = declare(job)
    stores_ = app.stores_for(db, "t")
    await scheduler.trigger_now(stores_, schedule, "t")
    transport = MemoryTransport(f"memory://{unique('jobs')}")
    await transport.connect()
    (handler,) = scheduler.job_handlers([schedule], stores_)
    worker = Worker([handler], transport, source="t", transactions=stores_.units)
    await worker.start()
    try:
        wire = await job_wire(db, schedule, transport.binary_prefix)
        await asyncio.gather(transport.publish(schedule.topic, wire), transport.publish(schedule.topic, wire))
        await wait_for(lambda: settled(handler.name) == 2, 15, "both deliveries to be settled")
        assert await worker.stop(5)
    finally:
        await transport.close()
    run = await the_run(db, schedule)
    assert (len(ledger.runs), run.status) == (1, claims.SUCCEEDED), ledger.who()
    assert (outcome(handler.name, "succeeded"), outcome(handler.name, "duplicate")) == (1, 1)


async def test_a_run_whose_worker_crashed_mid_job_runs_again_once_after_its_lease(
    db: Database, caplog_info: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(caplog_info)
    hang = asyncio.Event()

    async def job(ctx: Context) -> None:
        if not ledger.runs:  # the first attempt hangs until its worker "crashes"
            ledger.runs.append(("crashed", time.monotonic()))
            await hang.wait()
        await ledger.run("taken over")

    schedule = declare(job, timeout=4.0)  # a lease of half the timeout: 2 s
    stores_ = app.stores_for(db, "t")
    await scheduler.trigger_now(stores_, schedule, "t")
    url = f"memory://{unique('jobs')}"
    crashing, survivor = MemoryTransport(url), MemoryTransport(url)
    await crashing.connect()
    await survivor.connect()
    severed = SeveredStore(stores_.schedules)
    crashed_stores = dataclasses.replace(stores_, schedules=severed)  # type: ignore[arg-type]
    (crashed_handler,) = scheduler.job_handlers([schedule], crashed_stores)
    first = Worker([crashed_handler], crashing, source="t", transactions=stores_.units)
    await first.start()
    wire = await job_wire(db, schedule, crashing.binary_prefix)
    try:
        await crashing.publish(schedule.topic, wire)
        await wait_for(lambda: len(ledger.runs) == 1, 3, "the first attempt to start the job")
        severed.severed = True  # the crash: nothing the first attempt does reaches the database any more
        assert not await first.stop(0)
        await crashing.close()  # the broker redelivers the unsettled message
        (handler,) = scheduler.job_handlers([schedule], stores_)
        second = Worker([handler], survivor, source="t", transactions=stores_.units)
        await second.start()
        await survivor.publish(schedule.topic, wire)  # and a duplicate of it arrives too
        await wait_for(lambda: settled(handler.name) == 2, 20, "both deliveries to be settled")
        assert await second.stop(5)
    finally:
        hang.set()
        await survivor.close()
    run = await the_run(db, schedule)
    assert (ledger.who(), run.status) == (["crashed", "taken over"], claims.SUCCEEDED)
    (_, crashed_at), (_, taken_at) = ledger.runs
    assert taken_at - crashed_at >= 1.5, "the run was taken over before the crashed attempt's 2 s lease ran out"


async def test_a_job_message_delivered_after_its_run_succeeded_is_acked_as_a_duplicate(
    db: Database, caplog_info: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(caplog_info)

    async def job(ctx: Context) -> None:
        await ledger.run(ctx.message.id, gate=False)

    schedule = declare(job)
    stores_ = app.stores_for(db, "t")
    await scheduler.trigger_now(stores_, schedule, "t")
    transport = MemoryTransport(f"memory://{unique('jobs')}")
    await transport.connect()
    (handler,) = scheduler.job_handlers([schedule], stores_)
    worker = Worker([handler], transport, source="t", transactions=stores_.units)
    await worker.start()
    try:
        wire = await job_wire(db, schedule, transport.binary_prefix)
        await transport.publish(schedule.topic, wire)
        await wait_for(lambda: settled(handler.name) == 1, 10, "the run")
        finished = await the_run(db, schedule)
        await transport.publish(schedule.topic, wire)  # a duplicate (a relay crash between publish and mark)
        await wait_for(lambda: settled(handler.name) == 2, 10, "the duplicate to be settled")
        assert await worker.stop(5)
    finally:
        await transport.close()
    assert (len(ledger.runs), await the_run(db, schedule)) == (1, finished)
    assert (outcome(handler.name, "succeeded"), outcome(handler.name, "duplicate")) == (1, 1)


async def test_a_delivery_waiting_for_a_run_whose_attempt_fails_retries_it_once_after(
    db: Database, caplog_info: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(caplog_info)
    ended: dict[str, float] = {}

    async def job(ctx: Context) -> None:
        first = not ledger.runs
        who = "failing" if first else "retry"
        await ledger.run(who)
        ended[who] = time.monotonic()
        if first:
            raise RuntimeError("the first attempt fails")

    schedule = declare(job)
    stores_ = app.stores_for(db, "t")
    await scheduler.trigger_now(stores_, schedule, "t")
    transport = MemoryTransport(f"memory://{unique('jobs')}")
    await transport.connect()
    (handler,) = scheduler.job_handlers([schedule], stores_)
    worker = Worker([handler], transport, source="t", transactions=stores_.units)
    await worker.start()
    try:
        wire = await job_wire(db, schedule, transport.binary_prefix)
        await asyncio.gather(transport.publish(schedule.topic, wire), transport.publish(schedule.topic, wire))
        await wait_for(lambda: settled(handler.name) == 2, 20, "both messages to be settled")
        assert await worker.stop(5)
    finally:
        await transport.close()
    run = await the_run(db, schedule)
    assert (ledger.who(), run.status) == (["failing", "retry"], claims.SUCCEEDED)
    (_, retried_at) = ledger.runs[1]
    assert retried_at >= ended["failing"], "the retry ran while the failing attempt was still running"
    assert (outcome(handler.name, "succeeded"), outcome(handler.name, "duplicate")) == (1, 1)


async def test_a_sync_job_that_timed_out_holds_its_run_until_its_thread_ends(db: Database) -> None:
    runs: dict[str, tuple[float, float]] = {}  # (start, end) of each run, by the monotonic clock

    def job() -> None:
        started = time.monotonic()
        who = "retry" if "overrunning" in runs else "overrunning"
        runs[who] = (started, math.inf)  # running
        if who == "overrunning":
            time.sleep(6.5)  # well past the 3 s timeout: a thread cannot be interrupted
        runs[who] = (started, time.monotonic())

    schedule = declare(job, timeout=3)  # a 1.5 s lease renewed each 0.5 s: a busy machine can delay a renewal
    stores_ = app.stores_for(db, "t")
    await scheduler.trigger_now(stores_, schedule, "t")
    transport = MemoryTransport(f"memory://{unique('jobs')}")
    await transport.connect()
    (handler,) = scheduler.job_handlers([schedule], stores_)
    worker = Worker([handler], transport, source="t", transactions=stores_.units)
    await worker.start()
    try:
        await transport.publish(schedule.topic, await job_wire(db, schedule, transport.binary_prefix))
        await wait_for(lambda: settled(handler.name) == 1, 20, "the retry to succeed")
        assert await worker.stop(5)
    finally:
        await transport.close()
    run = await the_run(db, schedule)
    assert (sorted(runs), run.status) == (["overrunning", "retry"], claims.SUCCEEDED)
    assert runs["retry"][0] >= runs["overrunning"][1], "the retry ran beside the timed-out attempt's thread"
