"""Cron jobs on workers: each fire's job runs once, whatever the deliveries of its message.

The scheduler (:mod:`conveyor.runtime.scheduler`) claims a fire and enqueues
its job message; a worker runs the job as a handler of ``schedules.<name>``.
A job message can be delivered more than once: a duplicate publish, a broker
redelivery after a lost channel or a dead worker. A delivery runs the job only
if it starts the run (:meth:`conveyor.persistence.ScheduleStore.start`: one
conditional update, one winner), holding it with a lease it renews while the
job runs; every other delivery waits, its message unsettled, until that
attempt finished or its lease ran out:

* the run succeeded (or was skipped): the delivery is acknowledged as a duplicate;
* the run failed: the delivery retries it (still one at a time);
* the lease ran out (the attempt's worker died): the delivery takes the run over.

Only the owner of a run records its outcome, so an attempt whose run was taken
over undoes its writes instead of recording a second outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from conveyor import context, envelope, errors, payloads, persistence, registry, retry
from conveyor.runtime import threads
from conveyor.runtime.handling import SYNC_GRACE
from conveyor.scheduling import schedules as scheduling
from conveyor.transaction import AlreadyHandled

log = logging.getLogger("conveyor.scheduler")
JOB_LEASE = 30.0
"""Seconds a job attempt holds its run without renewing it (at most half the job's timeout)."""
WAIT_POLL = 1.0
"""Longest pause (seconds) between looks at a run another attempt holds."""


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
        claims = stores.schedules
        run_id = int(job["run_id"])
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        await _take_run(stores, schedule, run_id, owner, lease)
        done = asyncio.Event()
        _keep(asyncio.create_task(_renew_lease(stores, schedule.name, run_id, owner, lease, done)))
        args = (ctx,) if takes_context else ()
        running: asyncio.Future[Any] | None = None
        try:
            if is_async:
                await schedule.func(*args)
            else:
                running = threads.run(schedule.func, *args)
                await asyncio.shield(running)
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
            if ctx.unit is not None:  # release the attempt's locks first (SQLite: its write lock) or the mark waits
                await ctx.unit.rollback(exc)
            if running is not None and not running.done():  # a sync job timed out, its thread runs on
                _keep(asyncio.create_task(_release_after(running, stores, schedule, run_id, owner, text, done)))
                raise
            done.set()
            await _mark_failed(stores, run_id, owner, text)
            raise
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


async def _release_after(
    running: asyncio.Future[Any],
    stores: persistence.Persistence,
    schedule: scheduling.Schedule,
    run_id: int,
    owner: str,
    text: str,
    done: asyncio.Event,
) -> None:
    """Hold a timed-out sync job's run (its lease renewed) until its thread ends, within a bound; then fail it.

    The thread cannot be interrupted: releasing the run at once would let the
    retry run the job beside it. The retry waits for the run instead.
    """
    grace = max(10 * (schedule.timeout or 0.0), SYNC_GRACE)
    try:
        await asyncio.wait([running], timeout=grace)
        if not running.done():
            log.error(
                "%s: run %d timed out and its thread still runs after %.0fs more; its retry may overlap it",
                schedule.name, run_id, grace,
            )  # fmt: skip
    finally:
        done.set()
    await _mark_failed(stores, run_id, owner, text)


async def _mark_failed(stores: persistence.Persistence, run_id: int, owner: str, text: str) -> None:
    """Record that ``owner``'s attempt failed; a database failure leaves the run to its lease."""
    with contextlib.suppress(errors.StoreError):
        async with stores.database.transaction() as tx:
            await stores.schedules.finish(tx, run_id, "failed", error=text[:2000], owner=owner)


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
