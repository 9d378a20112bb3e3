"""The scheduler: claims each fire of each schedule once, across replicas, and enqueues its job.

Every tick, for each schedule that is not paused, the scheduler reads the
database clock and the latest claimed fire, plans the due fires
(:func:`conveyor.scheduling.schedules.plan`, which applies the misfire policy),
and for each one inserts the claim ``(schedule, UTC fire time)`` and the job's
outbox message in one transaction. The unique claim means that of N replicas
racing for a fire exactly one enqueues it; the relay then publishes the job to
``schedules.<name>``, where a worker runs it as a handler (retries, dead
letters, traces) and records started/succeeded/failed on the claim row.
One delivery of the job message runs the job: it takes the run with a lease
(renewed while the job runs), and any other delivery waits until that attempt
finished or its lease ran out.

The host clock is used only to decide how long to sleep; what is due is decided
by the database clock, so a skewed host neither fires early nor twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from conveyor import context, envelope, errors, payloads, persistence, ports, registry, retry, telemetry
from conveyor.runtime import threads
from conveyor.scheduling import schedules as scheduling
from conveyor.transaction import AlreadyHandled

log = logging.getLogger("conveyor.scheduler")
SKEW_WARNING = 5.0
"""Seconds of host/database clock disagreement that are logged."""
JOB_LEASE = 30.0
"""Seconds a job attempt holds its run without renewing it (at most half the job's timeout)."""
WAIT_POLL = 1.0
"""Longest pause (seconds) between looks at a run another attempt holds."""


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


def job_handlers(
    schedules: Sequence[scheduling.Schedule], stores: persistence.Persistence | None
) -> list[registry.Handler]:
    """Handlers that run schedules' jobs on a worker and record each run's outcome.

    Args:
        schedules: the schedules.
        stores: the service's persistence; None builds handlers only to
            declare their topology (``conveyor worker --declare-only``).
    """
    return [_job_handler(schedule, stores) for schedule in schedules]


def job_lease(schedule: scheduling.Schedule) -> timedelta:
    """How long a job attempt holds its run without renewing it: :data:`JOB_LEASE`, or half the job's timeout.

    Half the timeout, so a delivery that waits for a crashed attempt's lease
    to run out takes the run over well within its own timeout.
    """
    seconds = JOB_LEASE if schedule.timeout is None else min(JOB_LEASE, schedule.timeout / 2)
    return timedelta(seconds=seconds)


def _job_handler(schedule: scheduling.Schedule, stores: persistence.Persistence | None) -> registry.Handler:
    """A handler that runs ``schedule``'s job once per fire.

    A delivery runs the job only if it starts the run (:meth:`ScheduleStore.start`:
    one caller wins, and holds the run with a lease it renews while the job
    runs). A delivery that finds the run started by a live attempt holds its
    message, unsettled, until that attempt finishes (then it is acknowledged as
    a duplicate, or takes the run over if the attempt failed) or its lease runs
    out (its worker died: the delivery takes the run over). A delivery of a run
    that succeeded or was skipped is acknowledged as a duplicate. The success
    is recorded in the job's own unit of work, with its inbox row and whatever
    the job wrote in ``ctx.transaction()``, so a job's database effects apply
    once per fire.
    """
    takes_context = bool(inspect.signature(schedule.func).parameters)
    is_async = inspect.iscoroutinefunction(schedule.func)
    lease = job_lease(schedule)

    async def run_job(job: dict[str, Any], ctx: context.Context) -> None:
        if stores is None:
            raise errors.ConfigurationError(f"{schedule.name}: job handlers declared without a database cannot run")
        database, claims = stores.database, stores.schedules
        run_id = int(job["run_id"])
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        await _take_run(stores, schedule, run_id, owner, lease)
        done = asyncio.Event()
        _keep(asyncio.create_task(_renew_lease(stores, schedule.name, run_id, owner, lease, done)))
        args = (ctx,) if takes_context else ()
        try:
            if is_async:
                await schedule.func(*args)
            else:
                await threads.run(schedule.func, *args)
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
            if ctx.unit is not None:  # release the attempt's locks first (SQLite: its write lock) or the mark waits
                await ctx.unit.rollback(exc)
            done.set()
            with contextlib.suppress(errors.StoreError):
                async with database.transaction() as tx:
                    await claims.finish(tx, run_id, "failed", error=text[:2000], owner=owner)
            raise
        finally:
            done.set()  # the renewal in flight, if any, ends; none starts again
        async with ctx.transaction() as job_tx:  # joins the job's own transaction, if it opened one
            if not await claims.finish(job_tx.session, run_id, "succeeded", owner=owner):
                raise errors.ConcurrencyConflict(
                    f"{schedule.name}: run {run_id} was taken over by another delivery after this attempt's "
                    "lease ran out; this attempt's writes are undone"
                )

    run_job.__qualname__ = f"job[{schedule.where}]"
    return registry.Handler(
        name=schedule.topic,
        topic=schedule.topic,
        func=run_job,
        decode=payloads.decoder_for(dict[str, Any], schedule.where),
        takes_context=True,
        is_async=True,
        retry=retry.RetryPolicy(max_attempts=schedule.max_attempts),
        timeout=schedule.timeout,
        concurrency=None,
    )


async def _take_run(
    stores: persistence.Persistence, schedule: scheduling.Schedule, run_id: int, owner: str, lease: timedelta
) -> None:
    """Start the run for ``owner``, waiting while another live attempt holds it.

    Raises:
        AlreadyHandled: the run succeeded or was skipped (or is gone): this delivery is a duplicate.
        StoreError: the database failed.
    """
    waiting = False
    while True:
        async with stores.database.transaction() as tx:
            if await stores.schedules.start(tx, run_id, owner=owner, lease=lease):
                if waiting:
                    log.info("%s: run %d taken over by this delivery", schedule.name, run_id)
                return
            run = await stores.schedules.run(tx, run_id)
            now = await stores.schedules.now(tx)
        if run is None or run.status in ("succeeded", "skipped"):
            log.info("%s: run %d already finished; duplicate job message acknowledged", schedule.name, run_id)
            raise AlreadyHandled(f"{schedule.name}: run {run_id} is {run.status if run else 'gone'}")
        if run.status != "started":
            continue  # it failed just now: try to start it again
        if not waiting:
            waiting = True
            until = "unknown" if run.lease_until is None else envelope.format_time(run.lease_until)
            log.info(
                "%s: run %d is being run by %s (lease until %s); this delivery waits for it",
                schedule.name, run_id, run.owner, until,
            )  # fmt: skip
        remaining = WAIT_POLL if run.lease_until is None else (run.lease_until - now).total_seconds()
        await asyncio.sleep(min(max(remaining, 0.01), WAIT_POLL))


async def _renew_lease(
    stores: persistence.Persistence, name: str, run_id: int, owner: str, lease: timedelta, done: asyncio.Event
) -> None:
    """Renew ``owner``'s lease every third of it until ``done`` is set or the run is no longer its."""
    every = lease.total_seconds() / 3
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)
        if done.is_set():
            return
        try:
            async with stores.database.transaction() as tx:
                held = await stores.schedules.renew(tx, run_id, owner, lease)
        except errors.StoreError as exc:
            log.warning("%s: could not renew the lease on run %d (%s); trying again", name, run_id, exc)
            continue
        if not held and not done.is_set():
            log.error(
                "%s: run %d was taken over by another delivery (this attempt's lease ran out); "
                "this attempt's database writes will be undone",
                name, run_id,
            )  # fmt: skip
            return


_renewals: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    """Hold a reference to a lease renewal until it ends (the event loop keeps only weak ones)."""
    _renewals.add(task)
    task.add_done_callback(_renewals.discard)
