"""The scheduler: claims each fire of each schedule once, across replicas, and enqueues its job.

Every tick, for each schedule that is not paused, the scheduler reads the
database clock and the latest claimed fire, plans the due fires
(:func:`conveyor.scheduling.schedules.plan`, which applies the misfire policy),
and for each one inserts the claim ``(schedule, UTC fire time)`` and the job's
outbox message in one transaction. The unique claim means that of N replicas
racing for a fire exactly one enqueues it; the relay then publishes the job to
``schedules.<name>``, where a worker runs it as a handler (retries, dead
letters, traces) and records started/succeeded/failed on the claim row.
One delivery of the job message runs the job (:mod:`conveyor.runtime.scheduler_jobs`):
it takes the run with a lease, renewed while the job runs, and any other
delivery waits until that attempt finished or its lease ran out.

The host clock is used only to decide how long to sleep; what is due is decided
by the database clock, so a skewed host neither fires early nor twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from conveyor import envelope, errors, persistence, ports, telemetry
from conveyor.runtime.scheduler_jobs import job_handlers as job_handlers
from conveyor.scheduling import schedules as scheduling

log = logging.getLogger("conveyor.scheduler")
SKEW_WARNING = 5.0
"""Seconds of host/database clock disagreement that are logged."""


@dataclass(frozen=True, slots=True)
class SchedulerOptions:
    """How the scheduler paces itself.

    Attributes:
        grace: a fire found at most this late is on time; older ones are misfires.
        max_sleep: longest pause between ticks, in seconds.
        retention: finished runs older than this are deleted.
        stall_after: seconds without a completed tick after which :meth:`Scheduler.health`
            reports a stall (fires are then overdue).
    """

    grace: timedelta = scheduling.DEFAULT_GRACE
    max_sleep: float = 1.0
    retention: timedelta = timedelta(days=7)
    stall_after: float = 60.0


class Scheduler:
    """Claims and enqueues the fires of a set of schedules.

    Args:
        schedules: the schedules to run.
        stores: the service's persistence (claims and outbox).
        source: CloudEvents ``source`` of job messages.
        clock: the host clock (injectable). Only used to report skew: what is
            due is always decided by the database clock.
        options: pacing.
    """

    def __init__(
        self,
        schedules: Sequence[scheduling.Schedule],
        stores: persistence.Persistence,
        *,
        source: str,
        clock: ports.Clock | None = None,
        options: SchedulerOptions | None = None,
    ) -> None:
        self._schedules = list(schedules)
        self._stores = stores
        self._database = stores.database
        self._claims = stores.schedules
        self._source = source
        self._clock = clock or ports.SystemClock()
        self._options = options or SchedulerOptions()
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.skew = 0.0
        """Seconds the host clock is ahead of the database clock, as of the last tick."""
        self._next_skew_warning = 0.0
        self._last_tick = time.monotonic()
        self._last_error = ""
        telemetry.SCHEDULER_TICK_AGE.set_function(self.tick_age)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; back off while the database is unavailable."""
        failures = 0
        while not stop.is_set():
            try:
                wait = await self.tick()
                failures = 0
                self._last_tick = time.monotonic()
            except errors.StoreError as exc:
                failures += 1
                wait = min(2.0**failures, 30.0)
                self._last_error = str(exc)
                log.error("scheduler tick failed (%s); retrying in %.0fs", exc, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    def tick_age(self) -> float:
        """Seconds since the last completed tick (``conveyor_scheduler_last_tick_age_seconds``)."""
        return time.monotonic() - self._last_tick

    async def health(self) -> None:
        """Readiness probe: a tick (every due fire claimed) completed within ``stall_after`` seconds.

        Raises:
            ConveyorError: no tick completed for longer (the database fails or
                holds the claims); due fires are overdue meanwhile.
        """
        since = self.tick_age()
        if since > self._options.stall_after:
            why = f"; last error: {self._last_error}" if self._last_error else " (a tick is stuck)"
            raise errors.ConveyorError(
                f"the scheduler has not completed a tick for {since:.0f}s (limit "
                f"{self._options.stall_after:.0f}s): due fires are overdue{why}"
            )

    async def tick(self) -> float:
        """Claim every due fire now; return seconds until the next one is due (capped).

        Raises:
            StoreError: the database failed.
        """
        async with self._database.transaction(readonly=True) as tx:
            now = await self._claims.now(tx)
            states = await self._claims.states(tx)
        self._check_skew(now)
        next_due: datetime | None = None
        for schedule in self._schedules:
            state = states.get(schedule.name)
            if state is None or not state.paused:
                await self._claim_due(schedule, now, state)
            upcoming = schedule.next_fires(now, 1)
            if upcoming and (next_due is None or upcoming[0] < next_due):
                next_due = upcoming[0]
        if next_due is None:
            return self._options.max_sleep
        return min(max((next_due - now).total_seconds(), 0.01), self._options.max_sleep)

    def _check_skew(self, database_now: datetime) -> None:
        """Warn (once a minute) when this host's clock disagrees with the database's."""
        skew = (self._clock.now() - database_now).total_seconds()
        self.skew = skew
        if abs(skew) > SKEW_WARNING and self._clock.monotonic() >= self._next_skew_warning:
            self._next_skew_warning = self._clock.monotonic() + 60
            log.warning("host clock is %+.1fs off the database clock; the database clock decides what is due", skew)

    async def _claim_due(
        self, schedule: scheduling.Schedule, now: datetime, state: persistence.ScheduleState | None
    ) -> None:
        async with self._database.transaction() as tx:
            last = await self._claims.last_fire(tx, schedule.name)
            if state is not None and state.resumed_at is not None:
                last = state.resumed_at if last is None else max(last, state.resumed_at)
            for fire in scheduling.plan(schedule, last, now, self._options.grace):
                await self._claim(tx, schedule, fire, now)

    async def _claim(self, tx: Any, schedule: scheduling.Schedule, fire: scheduling.Fire, now: datetime) -> None:
        run = fire.run
        if run and schedule.overlap == "skip":
            stale = timedelta(seconds=(schedule.timeout or 3600) * schedule.max_attempts + 60)
            if await self._claims.running_since(tx, schedule.name, now - stale):
                run = False
                log.warning("%s: fire %s skipped, the previous run is still going", schedule.name, fire.at)
        status: persistence.RunStatus = "claimed" if run else "skipped"
        run_id = await self._claims.claim(tx, schedule.name, fire.at, status=status, claimed_by=self.identity)
        if run_id is None or not run:
            return
        await enqueue(self._stores, tx, schedule, fire.at, run_id, "cron", self._source)
        log.info("%s: claimed fire %s (run %d)", schedule.name, envelope.format_time(fire.at), run_id)

    async def purge(self) -> int:
        """Delete finished runs older than the retention period."""
        async with self._database.transaction() as tx:
            return await self._claims.purge(tx, self._options.retention)


async def enqueue(
    stores: persistence.Persistence,
    tx: Any,
    schedule: scheduling.Schedule,
    fire_time: datetime,
    run_id: int,
    trigger: str,
    source: str,
) -> envelope.Envelope:
    """Put a schedule's job message in the outbox (jitter delays it; the fire keeps its time)."""
    at = None
    if schedule.jitter:
        at = fire_time + timedelta(seconds=random.uniform(0, schedule.jitter))
    data = {
        "schedule": schedule.name,
        "fire_time": envelope.format_time(fire_time),
        "run_id": run_id,
        "trigger": trigger,
    }
    event = envelope.create(schedule.topic, data, source=source, subject=schedule.name)
    await stores.outbox.add(tx, schedule.topic, event, at=at)
    return event


async def trigger_now(stores: persistence.Persistence, schedule: scheduling.Schedule, source: str) -> int:
    """Run a schedule once now (``conveyor schedules trigger``): a claim at the database time.

    Returns:
        The run's id.

    Raises:
        StoreError: the database failed.
    """
    async with stores.database.transaction() as tx:
        now = await stores.schedules.now(tx)
        run_id = await stores.schedules.claim(tx, schedule.name, now, status="claimed", claimed_by="manual")
        if run_id is None:  # the same microsecond as another trigger
            raise errors.ConcurrencyConflict(f"{schedule.name} was triggered at the same instant; try again")
        await enqueue(stores, tx, schedule, now, run_id, "manual", source)
        return run_id
