"""Schedule fire claims and run history: one row per (schedule, UTC fire time).

The unique constraint on ``(schedule, fire_time)`` is what makes a fire happen
once across any number of scheduler replicas: each replica inserts the claim
with ``ON CONFLICT DO NOTHING`` in the same transaction as the job's outbox
message, and only the one whose insert took effect enqueues the job. A row
then records the run: ``claimed`` -> ``started`` -> ``succeeded``/``failed``,
or ``skipped`` (misfire policy or overlap).

A run is started by one job attempt at a time: :func:`start` is a conditional
update that takes the run for an ``owner`` with a lease (``lease_until``, by
the database clock), which the attempt renews while the job runs
(:func:`renew`). Another delivery of the job message may start the run only
once it failed or the lease ran out (the attempt's worker died), and only the
owner records the outcome (:func:`finish`).

Pause state lives in ``schedule_states``; every replica reads it each tick.
All times are aware UTC; the database clock (:func:`database_now`) is the one
that decides what is due, so a host with a skewed clock neither fires early
nor twice.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import sqlalchemy as sa
from conveyor import persistence
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import database, models

CLAIMED, STARTED, SUCCEEDED, FAILED, SKIPPED = "claimed", "started", "succeeded", "failed", "skipped"
DEFAULT_LEASE = timedelta(seconds=30)
"""How long a run started without an explicit lease is held (and a run started before leases existed)."""


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Run = persistence.Run
State = persistence.ScheduleState


async def database_now(session: AsyncSession) -> datetime:
    """The database clock's current UTC time.

    Raises:
        StoreError: the database failed.
    """
    with database.translating():
        value = (await session.execute(sa.select(models.utcnow()))).scalar_one()
    if isinstance(value, str):  # SQLite returns the text as is from a bare SELECT
        value = datetime.fromisoformat(value[:26])
    return _utc(value)


async def last_fire(session: AsyncSession, schedule: str) -> datetime | None:
    """The latest claimed fire time of ``schedule`` (any status), or None."""
    table = models.schedule_claims
    with database.translating():
        value = (
            await session.execute(sa.select(sa.func.max(table.c.fire_time)).where(table.c.schedule == schedule))
        ).scalar_one()
    return None if value is None else _utc(value)


async def claim(
    session: AsyncSession, schedule: str, fire_time: datetime, *, status: str, claimed_by: str
) -> int | None:
    """Claim a fire in the caller's transaction.

    Returns:
        The new row's id, or None if some replica already claimed this fire.

    Raises:
        StoreError: the database failed.
    """
    insert = database.insert_for(session)
    statement = (
        insert(models.schedule_claims)
        .values(schedule=schedule, fire_time=_utc(fire_time), status=status, claimed_by=claimed_by)
        .on_conflict_do_nothing(index_elements=["schedule", "fire_time"])
        .returning(models.schedule_claims.c.id)
    )
    with database.translating():
        return (await session.execute(statement)).scalar_one_or_none()


async def mark(session: AsyncSession, run_id: int, status: str, error: str | None = None) -> None:
    """Record a run's progress (``started``, ``succeeded`` or ``failed``) with database time, unguarded."""
    table = models.schedule_claims
    values: dict[str, object] = {"status": status, "error": error}
    values["started_at" if status == STARTED else "finished_at"] = models.utcnow()
    with database.translating():
        await session.execute(sa.update(table).where(table.c.id == run_id).values(**values))


async def start(
    session: AsyncSession, run_id: int, *, owner: str | None = None, lease: timedelta = DEFAULT_LEASE
) -> bool:
    """Start a run for ``owner`` with a lease; return whether this caller may run the job.

    One conditional update, so of concurrent callers exactly one starts the
    run. A claimed or failed (a retry) run may start; a started run only once
    its lease ran out (its attempt died); a succeeded or skipped run is final.

    Args:
        session: the caller's transaction.
        run_id: the run.
        owner: who runs the job (one attempt); only the owner renews the lease and finishes the run.
        lease: how long the run is held without a renewal.

    Raises:
        StoreError: the database failed.
    """
    table = models.schedule_claims
    now = await database_now(session)
    expired = sa.or_(
        table.c.lease_until < now,
        sa.and_(table.c.lease_until.is_(None), table.c.started_at < now - DEFAULT_LEASE),
    )
    statement = (
        sa.update(table)
        .where(
            table.c.id == run_id,
            sa.or_(table.c.status.in_((CLAIMED, FAILED)), sa.and_(table.c.status == STARTED, expired)),
        )
        .values(status=STARTED, started_at=models.utcnow(), owner=owner, lease_until=now + lease, error=None)
    )
    with database.translating():
        result = await session.execute(statement)
    return int(result.rowcount or 0) == 1  # type: ignore[attr-defined]


async def renew(session: AsyncSession, run_id: int, owner: str, lease: timedelta) -> bool:
    """Extend ``owner``'s lease on a started run to ``lease`` from now; False if the run is not its any more.

    Raises:
        StoreError: the database failed.
    """
    table = models.schedule_claims
    now = await database_now(session)
    statement = (
        sa.update(table)
        .where(table.c.id == run_id, table.c.status == STARTED, table.c.owner == owner)
        .values(lease_until=now + lease)
    )
    with database.translating():
        result = await session.execute(statement)
    return int(result.rowcount or 0) == 1  # type: ignore[attr-defined]


async def finish(
    session: AsyncSession,
    run_id: int,
    status: Literal["succeeded", "failed"],
    error: str | None = None,
    *,
    owner: str | None = None,
) -> bool:
    """Record a run's outcome; return whether it was recorded.

    A run that already succeeded (or was skipped) keeps its status. With
    ``owner``, only a run that owner started and still holds is finished: an
    attempt whose lease ran out and was taken over records nothing.

    Raises:
        StoreError: the database failed.
    """
    table = models.schedule_claims
    condition: sa.ColumnElement[bool] = table.c.status.in_((CLAIMED, STARTED, FAILED))
    if owner is not None:
        condition = sa.and_(table.c.status == STARTED, table.c.owner == owner)
    statement = (
        sa.update(table)
        .where(table.c.id == run_id, condition)
        .values(status=status, finished_at=models.utcnow(), error=error)
    )
    with database.translating():
        result = await session.execute(statement)
    return int(result.rowcount or 0) == 1  # type: ignore[attr-defined]


async def running_since(session: AsyncSession, schedule: str, started_after: datetime) -> bool:
    """True if a run of ``schedule`` claimed or started after ``started_after`` has not finished."""
    table = models.schedule_claims
    statement = sa.select(sa.func.count()).where(
        table.c.schedule == schedule,
        table.c.status.in_((CLAIMED, STARTED)),
        table.c.claimed_at > _utc(started_after),
    )
    with database.translating():
        return int((await session.execute(statement)).scalar_one()) > 0


def _run(row: sa.RowMapping) -> Run:
    return Run(
        id=row["id"],
        schedule=row["schedule"],
        fire_time=_utc(row["fire_time"]),
        status=row["status"],
        claimed_by=row["claimed_by"],
        claimed_at=_utc(row["claimed_at"]),
        started_at=row["started_at"] and _utc(row["started_at"]),
        finished_at=row["finished_at"] and _utc(row["finished_at"]),
        error=row["error"],
        owner=row["owner"],
        lease_until=row["lease_until"] and _utc(row["lease_until"]),
    )


async def history(session: AsyncSession, schedule: str, limit: int = 10) -> list[Run]:
    """The latest runs of ``schedule``, newest first."""
    table = models.schedule_claims
    statement = sa.select(table).where(table.c.schedule == schedule).order_by(table.c.fire_time.desc()).limit(limit)
    with database.translating():
        rows = (await session.execute(statement)).mappings().all()
    return [_run(row) for row in rows]


async def run(session: AsyncSession, run_id: int) -> Run | None:
    """One run by id, or None if there is none (never claimed, or purged)."""
    table = models.schedule_claims
    with database.translating():
        row = (await session.execute(sa.select(table).where(table.c.id == run_id))).mappings().one_or_none()
    return None if row is None else _run(row)


async def purge(session: AsyncSession, older_than: timedelta, now: datetime) -> int:
    """Delete finished runs fired before ``now - older_than``, keeping each schedule's latest."""
    table = models.schedule_claims
    latest = sa.select(sa.func.max(table.c.id)).group_by(table.c.schedule).scalar_subquery()
    statement = sa.delete(table).where(
        table.c.fire_time < _utc(now - older_than),
        table.c.status.in_((SUCCEEDED, FAILED, SKIPPED)),
        table.c.id.not_in(latest),
    )
    with database.translating():
        result = await session.execute(statement)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def states(session: AsyncSession) -> dict[str, State]:
    """Pause state of every schedule that was ever paused."""
    table = models.schedule_states
    with database.translating():
        rows = (await session.execute(sa.select(table))).mappings().all()
    return {row["schedule"]: State(bool(row["paused"]), row["resumed_at"] and _utc(row["resumed_at"])) for row in rows}


async def set_paused(session: AsyncSession, schedule: str, paused: bool) -> None:
    """Pause or resume a schedule for every replica.

    Resuming a paused schedule records the database time: fires due while it
    was paused are skipped. Resuming one that is not paused changes nothing,
    so its missed fires still run as its misfire policy says.
    """
    table = models.schedule_states
    insert = database.insert_for(session)
    values: dict[str, object] = {"schedule": schedule, "paused": paused, "updated_at": models.utcnow()}
    update: dict[str, object] = {"paused": paused, "updated_at": models.utcnow()}
    if not paused:
        update["resumed_at"] = sa.case((table.c.paused, models.utcnow()), else_=table.c.resumed_at)
    statement = insert(table).values(**values).on_conflict_do_update(index_elements=["schedule"], set_=update)
    with database.translating():
        await session.execute(statement)


class SqlScheduleStore:
    """Schedule claims, runs and pause state on SQL (:class:`conveyor.persistence.ScheduleStore`).

    Args:
        db: the database (for its dialect; every method joins the caller's ``tx``).
    """

    def __init__(self, db: database.Database) -> None:
        self.db = db

    async def now(self, tx: AsyncSession) -> datetime:
        """The database clock (aware UTC)."""
        return await database_now(tx)

    async def claim(
        self, tx: AsyncSession, schedule: str, fire_time: datetime, *, status: persistence.RunStatus, claimed_by: str
    ) -> int | None:
        """Claim a fire; the run id, or None if it was claimed already."""
        return await claim(tx, schedule, fire_time, status=status, claimed_by=claimed_by)

    async def start(
        self, tx: AsyncSession, run_id: int, *, owner: str | None = None, lease: timedelta = DEFAULT_LEASE
    ) -> bool:
        """Start a run for ``owner`` unless it is final or held by a live lease; return whether it may run."""
        return await start(tx, run_id, owner=owner, lease=lease)

    async def renew(self, tx: AsyncSession, run_id: int, owner: str, lease: timedelta) -> bool:
        """Extend ``owner``'s lease on a started run; False if the run is not its any more."""
        return await renew(tx, run_id, owner, lease)

    async def finish(
        self,
        tx: AsyncSession,
        run_id: int,
        status: Literal["succeeded", "failed"],
        error: str | None = None,
        *,
        owner: str | None = None,
    ) -> bool:
        """Record a run's outcome, never undoing a success; with ``owner``, only if it holds the run."""
        return await finish(tx, run_id, status, error, owner=owner)

    async def run(self, tx: AsyncSession, run_id: int) -> persistence.Run | None:
        """One run by id, or None."""
        return await run(tx, run_id)

    async def last_fire(self, tx: AsyncSession, schedule: str) -> datetime | None:
        """The latest claimed fire time of ``schedule``, or None."""
        return await last_fire(tx, schedule)

    async def running_since(self, tx: AsyncSession, schedule: str, started_after: datetime) -> bool:
        """True if a run claimed after ``started_after`` has not finished."""
        return await running_since(tx, schedule, started_after)

    async def states(self, tx: AsyncSession) -> dict[str, persistence.ScheduleState]:
        """Pause state of every schedule ever paused."""
        return await states(tx)

    async def set_paused(self, tx: AsyncSession, schedule: str, paused: bool) -> None:
        """Pause or resume ``schedule`` for every replica."""
        await set_paused(tx, schedule, paused)

    async def history(self, tx: AsyncSession, schedule: str, limit: int = 10) -> list[persistence.Run]:
        """The latest runs of ``schedule``, newest first."""
        return await history(tx, schedule, limit)

    async def purge(self, tx: AsyncSession, older_than: timedelta) -> int:
        """Delete finished runs older than ``older_than`` by the database clock."""
        return await purge(tx, older_than, await database_now(tx))
