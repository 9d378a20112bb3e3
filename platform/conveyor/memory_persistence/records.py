"""Schedule runs, held dead letters and saga instances, in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from conveyor import envelope, errors, heartbeats, persistence
from conveyor.memory_persistence.handling import OUTBOX, OUTBOX_IDS
from conveyor.memory_persistence.tables import MemoryDatabase, MemoryTx
from conveyor.sagas import engine
from conveyor.sagas import store as saga_store

RUNS = "schedule_runs"
RUN_KEYS = "schedule_run_keys"
PAUSED = "schedule_states"
HELD = "held_dead_letters"
SAGAS = "sagas"
SAGA_LOG = "saga_log"
HEARTBEATS = "heartbeats"
DEFAULT_LEASE = timedelta(seconds=30)
"""How long a started run is held without a renewal (as :meth:`conveyor.persistence.ScheduleStore.start`)."""


class MemoryScheduleStore:
    """Schedule fire claims, runs and pause state (:class:`conveyor.persistence.ScheduleStore`)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def now(self, tx: MemoryTx) -> datetime:
        """The database clock."""
        await self.db.hook("schedules.now")
        return self.db.now()

    async def claim(
        self,
        tx: MemoryTx,
        schedule: str,
        fire_time: datetime,
        *,
        status: persistence.RunStatus,
        claimed_by: str,
    ) -> int | None:
        """Claim a fire once; None if it is claimed (committed, or by a transaction that then commits)."""
        await self.db.hook("schedules.claim")
        key = (schedule, fire_time.astimezone(UTC))
        await self.db.lock(tx, RUN_KEYS, key)
        if tx.get(RUN_KEYS, key) is not None:
            return None
        run_id = next(self.db.ids)
        tx.writes.setdefault(RUN_KEYS, {})[key] = run_id
        run = persistence.Run(run_id, schedule, key[1], status, claimed_by, self.db.now(), None, None, None)
        await tx.put(RUNS, run_id, run)
        return run_id

    async def _run(self, tx: MemoryTx, run_id: int) -> persistence.Run | None:
        await self.db.lock(tx, RUNS, run_id)
        run: persistence.Run | None = tx.get(RUNS, run_id)
        return run

    async def start(
        self, tx: MemoryTx, run_id: int, *, owner: str | None = None, lease: timedelta = DEFAULT_LEASE
    ) -> bool:
        """Start a run for ``owner``, held for ``lease``; return whether the caller may run the job.

        A claimed or failed run starts; a started run only once its lease ran
        out; a succeeded or skipped run never does. The row lock makes one of
        concurrent callers start it.
        """
        await self.db.hook("schedules.start", tx)
        run = await self._run(tx, run_id)
        now = self.db.now()
        if run is None or run.status in ("succeeded", "skipped"):
            return False
        if run.status == "started":
            until = run.lease_until or ((run.started_at or now) + DEFAULT_LEASE)
            if until >= now:
                return False
        started = replace(run, status="started", started_at=now, owner=owner, lease_until=now + lease, error=None)
        await tx.put(RUNS, run_id, started)
        return True

    async def renew(self, tx: MemoryTx, run_id: int, owner: str, lease: timedelta) -> bool:
        """Extend ``owner``'s lease to ``lease`` from now; False if the run is no longer started by ``owner``."""
        await self.db.hook("schedules.renew", tx)
        run = await self._run(tx, run_id)
        if run is None or run.status != "started" or run.owner != owner:
            return False
        await tx.put(RUNS, run_id, replace(run, lease_until=self.db.now() + lease))
        return True

    async def finish(
        self,
        tx: MemoryTx,
        run_id: int,
        status: Literal["succeeded", "failed"],
        error: str | None = None,
        *,
        owner: str | None = None,
    ) -> bool:
        """Record a run's outcome; return whether it was recorded.

        A succeeded or skipped run keeps its status; with ``owner``, only a run
        that owner started and still holds is finished.
        """
        await self.db.hook("schedules.finish", tx)
        run = await self._run(tx, run_id)
        if run is None:
            return False
        if owner is not None and (run.status != "started" or run.owner != owner):
            return False
        if run.status not in ("claimed", "started", "failed"):
            return False
        await tx.put(RUNS, run_id, replace(run, status=status, error=error, finished_at=self.db.now()))
        return True

    async def run(self, tx: MemoryTx, run_id: int) -> persistence.Run | None:
        """One run by id, or None."""
        await self.db.hook("schedules.read", tx)
        found: persistence.Run | None = tx.get(RUNS, run_id)
        return found

    def _runs(self, tx: MemoryTx, schedule: str) -> list[persistence.Run]:
        return [run for _, run in tx.rows(RUNS) if run.schedule == schedule]

    async def last_fire(self, tx: MemoryTx, schedule: str) -> datetime | None:
        """The latest claimed fire time of ``schedule``, or None."""
        await self.db.hook("schedules.read")
        return max((run.fire_time for run in self._runs(tx, schedule)), default=None)

    async def running_since(self, tx: MemoryTx, schedule: str, started_after: datetime) -> bool:
        """True if a run claimed after ``started_after`` is claimed or started."""
        await self.db.hook("schedules.read")
        return any(
            run.claimed_at > started_after and run.status in ("claimed", "started") for run in self._runs(tx, schedule)
        )

    async def states(self, tx: MemoryTx) -> dict[str, persistence.ScheduleState]:
        """Pause state of every schedule that was ever paused."""
        await self.db.hook("schedules.read")
        return dict(tx.rows(PAUSED))

    async def set_paused(self, tx: MemoryTx, schedule: str, paused: bool) -> None:
        """Pause or resume ``schedule`` (resuming a schedule that is not paused changes nothing)."""
        await self.db.hook("schedules.pause")
        state: persistence.ScheduleState | None = tx.get(PAUSED, schedule)
        if paused:
            await tx.put(PAUSED, schedule, persistence.ScheduleState(True, None if state is None else state.resumed_at))
        elif state is not None and state.paused:
            await tx.put(PAUSED, schedule, persistence.ScheduleState(False, self.db.now()))

    async def history(self, tx: MemoryTx, schedule: str, limit: int = 10) -> list[persistence.Run]:
        """The latest runs of ``schedule``, newest fire first."""
        await self.db.hook("schedules.read")
        return sorted(self._runs(tx, schedule), key=lambda r: r.fire_time, reverse=True)[:limit]

    async def purge(self, tx: MemoryTx, older_than: timedelta) -> int:
        """Delete finished runs fired more than ``older_than`` ago, keeping each schedule's latest run."""
        await self.db.hook("schedules.purge", tx)
        cutoff = self.db.now() - older_than
        runs = [run for _, run in tx.rows(RUNS)]
        latest = {run.schedule: run.id for run in sorted(runs, key=lambda r: r.id)}
        old = [
            run for run in runs
            if run.fire_time < cutoff and run.status in ("succeeded", "failed", "skipped")
            and latest[run.schedule] != run.id
        ]  # fmt: skip
        for run in old:
            await tx.delete(RUNS, run.id)
        return len(old)


class MemoryDeadLetterStore:
    """Held dead letters (:class:`conveyor.persistence.DeadLetterStore`)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def hold(self, topic: str, message: envelope.WireMessage) -> None:
        """Store a dead letter for ``topic`` in a transaction of its own."""
        async with self.db.transaction() as tx:
            await self.db.hook("held.hold")
            held_id = next(self.db.ids)
            await tx.put(HELD, held_id, persistence.HeldMessage(held_id, topic, message, self.db.now()))

    async def held(self, topic: str, limit: int = 100) -> list[persistence.HeldMessage]:
        """Dead letters held for ``topic``, oldest first."""
        await self.db.hook("held.read")
        rows: list[persistence.HeldMessage] = [m for m in self.db.table(HELD).values() if m.topic == topic]
        return sorted(rows, key=lambda m: m.id)[:limit]

    async def release(self, ids: Sequence[int]) -> int:
        """Delete held dead letters; return how many."""
        async with self.db.transaction() as tx:
            found = [i for i in ids if tx.get(HELD, i) is not None]
            for held_id in found:
                await tx.delete(HELD, held_id)
        return len(found)


class MemorySagaStore:
    """Saga instances and step logs (:class:`conveyor.sagas.store.SagaStore`); :meth:`save` is a compare-and-set."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def load(self, tx: MemoryTx, saga: str, instance_id: str) -> saga_store.SagaRecord | None:
        """The instance, or None."""
        await self.db.hook("sagas.load")
        record: saga_store.SagaRecord | None = tx.get(SAGAS, (saga, instance_id))
        return record

    async def create(self, tx: MemoryTx, instance: engine.Instance) -> bool:
        """Insert a new instance; False if ``(saga, id)`` exists."""
        await self.db.hook("sagas.create")
        key = (instance.saga, instance.id)
        await self.db.lock(tx, SAGAS, key)
        if tx.get(SAGAS, key) is not None:
            return False
        now = self.db.now()
        tx.writes.setdefault(SAGAS, {})[key] = saga_store.SagaRecord(instance, now, now)
        return True

    async def save(self, tx: MemoryTx, instance: engine.Instance) -> None:
        """Replace the instance stored at ``instance.version - 1``.

        Raises:
            ConcurrencyConflict: the stored version is another one.
        """
        await self.db.hook("sagas.save")
        key = (instance.saga, instance.id)
        await self.db.lock(tx, SAGAS, key)
        stored: saga_store.SagaRecord | None = tx.get(SAGAS, key)
        if stored is None or stored.instance.version != instance.version - 1:
            raise errors.ConcurrencyConflict(
                f"saga {instance.saga} {instance.id} is no longer at version {instance.version - 1}"
            )
        tx.writes.setdefault(SAGAS, {})[key] = saga_store.SagaRecord(instance, stored.created_at, self.db.now())

    async def release_command(self, tx: MemoryTx, message_id: str) -> None:
        """Remove the outbox row an earlier send of ``message_id`` left, so the command can be added again."""
        await self.db.hook("sagas.release", tx)
        row_id = tx.get(OUTBOX_IDS, message_id)
        if row_id is not None:
            await tx.delete(OUTBOX, row_id)
            await tx.delete(OUTBOX_IDS, message_id)

    async def log(self, tx: MemoryTx, saga: str, instance_id: str, entries: Sequence[engine.Entry]) -> None:
        """Append lines to the instance's step log."""
        if not entries:
            return
        await self.db.hook("sagas.log")
        now = self.db.now()
        key = (saga, instance_id)
        await self.db.lock(tx, SAGA_LOG, key)
        lines: tuple[saga_store.LogRecord, ...] = tx.get(SAGA_LOG, key, ())
        tx.writes.setdefault(SAGA_LOG, {})[key] = (*lines, *(saga_store.LogRecord(now, e) for e in entries))

    async def find(
        self, tx: MemoryTx, *, saga: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[saga_store.SagaRecord]:
        """Instances, most recently changed first."""
        await self.db.hook("sagas.find")
        records: list[saga_store.SagaRecord] = [
            r for _, r in tx.rows(SAGAS)
            if (saga is None or r.instance.saga == saga) and (status is None or r.instance.status.value == status)
        ]  # fmt: skip
        records.sort(key=lambda r: (-r.updated_at.timestamp(), r.instance.id))
        return records[:limit]

    async def history(self, tx: MemoryTx, saga: str, instance_id: str, limit: int = 1000) -> list[saga_store.LogRecord]:
        """The instance's step log, oldest first."""
        await self.db.hook("sagas.history")
        lines: tuple[saga_store.LogRecord, ...] = tx.get(SAGA_LOG, (saga, instance_id), ())
        return list(lines[:limit])

    async def counts(self, tx: MemoryTx) -> dict[tuple[str, str], int]:
        """How many instances each ``(saga, status)`` has."""
        await self.db.hook("sagas.counts")
        found: dict[tuple[str, str], int] = {}
        for _, record in tx.rows(SAGAS):
            key = (record.instance.saga, record.instance.status.value)
            found[key] = found.get(key, 0) + 1
        return found


class MemoryHeartbeatStore:
    """The processes' heartbeats (:class:`conveyor.heartbeats.HeartbeatStore`)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db

    async def beat(self, heartbeat: heartbeats.Heartbeat) -> None:
        """Write ``heartbeat``, stamped with the database's time."""
        async with self.db.transaction() as tx:
            await tx.put(HEARTBEATS, heartbeat.id, (heartbeat, self.db.now()))

    async def seen(self) -> list[heartbeats.Seen]:
        """Every process's latest heartbeat, most recent first."""
        await self.db.hook("heartbeats.read")
        now = self.db.now()
        rows: dict[str, tuple[heartbeats.Heartbeat, datetime]] = self.db.table(HEARTBEATS)
        found = [heartbeats.Seen(beat, at, now - at) for beat, at in rows.values()]
        return sorted(found, key=lambda s: s.beat_at, reverse=True)

    async def leave(self, id: str) -> None:  # noqa: A002 - the heartbeat's id
        """Delete a process's row; nothing when there is none."""
        async with self.db.transaction() as tx:
            await tx.delete(HEARTBEATS, id)

    async def purge(self, older_than: timedelta) -> int:
        """Delete the rows of processes silent for longer than ``older_than``; return how many."""
        cutoff = self.db.now() - older_than
        async with self.db.transaction() as tx:
            old = [key for key, (_, at) in tx.rows(HEARTBEATS) if at < cutoff]
            for key in old:
                await tx.delete(HEARTBEATS, key)
        return len(old)
