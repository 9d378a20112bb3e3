"""Saga instances and step logs on SQL (:class:`conveyor.sagas.store.SagaStore`).

Every method joins the caller's transaction (``tx``, an ``AsyncSession``).
:meth:`SqlSagaStore.save` is a compare-and-set on ``version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from conveyor import errors
from conveyor.sagas import engine
from conveyor.sagas import store as saga_store
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import claims, database, models
from event_store.outbox import as_utc

_SAGAS = models.sagas
_LOG = models.saga_log


def _columns(instance: engine.Instance) -> dict[str, Any]:
    return {
        "status": instance.status.value, "step": instance.step, "waiting": instance.waiting,
        "sent": instance.sent, "undo_attempts": instance.undo_attempts, "error": instance.error,
        "state": instance.state, "version": instance.version, "deadline": instance.deadline,
        "cause": instance.cause, "timer_id": instance.timer_id,
    }  # fmt: skip


def _record(row: Any) -> saga_store.SagaRecord:
    instance = engine.Instance(
        saga=row.saga, id=row.id, state=dict(row.state), status=engine.Status(row.status), step=row.step,
        waiting=row.waiting, sent=row.sent, undo_attempts=row.undo_attempts, error=row.error, version=row.version,
        deadline=None if row.deadline is None else as_utc(row.deadline), cause=row.cause, timer_id=row.timer_id,
    )  # fmt: skip
    return saga_store.SagaRecord(instance, as_utc(row.created_at), as_utc(row.updated_at))


class SqlSagaStore:
    """Saga persistence on SQLite and PostgreSQL (tables ``sagas`` and ``saga_log``)."""

    async def load(self, tx: AsyncSession, saga: str, instance_id: str) -> saga_store.SagaRecord | None:
        """The instance, or None."""
        query = sa.select(_SAGAS).where(_SAGAS.c.saga == saga, _SAGAS.c.id == instance_id)
        row = (await tx.execute(query)).first()
        return None if row is None else _record(row)

    async def create(self, tx: AsyncSession, instance: engine.Instance) -> bool:
        """Insert a new instance; False if ``(saga, id)`` exists (nothing changed)."""
        values = {"saga": instance.saga, "id": instance.id, **_columns(instance)}
        insert = database.insert_for(tx)(_SAGAS).values(**values).on_conflict_do_nothing(index_elements=["saga", "id"])
        result = await tx.execute(insert)
        return bool(getattr(result, "rowcount", 0))

    async def save(self, tx: AsyncSession, instance: engine.Instance) -> None:
        """Replace the stored instance at version ``instance.version - 1``.

        Raises:
            ConcurrencyConflict: the stored version is another one.
        """
        update = (
            sa.update(_SAGAS)
            .where(_SAGAS.c.saga == instance.saga, _SAGAS.c.id == instance.id, _SAGAS.c.version == instance.version - 1)
            .values(**_columns(instance), updated_at=models.utcnow())
        )
        result = await tx.execute(update)
        if getattr(result, "rowcount", 0) != 1:
            raise errors.ConcurrencyConflict(
                f"saga {instance.saga} {instance.id} is no longer at version {instance.version - 1}: "
                "a concurrent transition was saved first; the message that caused this one is retried"
            )

    async def release_command(self, tx: AsyncSession, message_id: str) -> None:
        """Remove the outbox row of ``message_id``, if any, so the command can be added again under its id."""
        await tx.execute(sa.delete(models.outbox).where(models.outbox.c.message_id == message_id))

    async def cancel_timer(self, tx: AsyncSession, message_id: str) -> None:
        """Delete the outbox row of the timer ``message_id`` if it is still unsent (see the port)."""
        outbox = models.outbox
        await tx.execute(sa.delete(outbox).where(outbox.c.message_id == message_id, outbox.c.sent_at.is_(None)))

    async def log(self, tx: AsyncSession, saga: str, instance_id: str, entries: Sequence[engine.Entry]) -> None:
        """Append lines to the instance's step log."""
        if entries:
            rows = [
                {"saga": saga, "instance_id": instance_id, "step": e.step[:128], "event": e.event[:32],
                 "detail": e.detail, "token": e.token}
                for e in entries
            ]  # fmt: skip
            await tx.execute(sa.insert(_LOG), rows)

    async def find(
        self, tx: AsyncSession, *, saga: str | None = None, status: str | None = None, limit: int | None = 100
    ) -> list[saga_store.SagaRecord]:
        """Instances, most recently changed first (``limit`` None: every one)."""
        query = sa.select(_SAGAS).order_by(_SAGAS.c.updated_at.desc(), _SAGAS.c.id).limit(limit)
        if saga is not None:
            query = query.where(_SAGAS.c.saga == saga)
        if status is not None:
            query = query.where(_SAGAS.c.status == status)
        return [_record(row) for row in (await tx.execute(query)).all()]

    async def history(
        self, tx: AsyncSession, saga: str, instance_id: str, limit: int = 1000
    ) -> list[saga_store.LogRecord]:
        """The instance's step log, oldest first."""
        query = (
            sa.select(_LOG)
            .where(_LOG.c.saga == saga, _LOG.c.instance_id == instance_id)
            .order_by(_LOG.c.id)
            .limit(limit)
        )
        return [
            saga_store.LogRecord(as_utc(row.at), engine.Entry(row.step, row.event, row.detail, row.token))
            for row in (await tx.execute(query)).all()
        ]

    async def purge(self, tx: AsyncSession, older_than: timedelta, limit: int = 1000) -> int:
        """Delete at most ``limit`` finished instances unchanged for ``older_than`` (database clock) and their logs."""
        cutoff = await claims.database_now(tx) - older_than
        finished = [status.value for status in engine.Status if status.finished]
        chosen = (
            sa.select(_SAGAS.c.saga, _SAGAS.c.id)
            .where(_SAGAS.c.status.in_(finished), _SAGAS.c.updated_at < cutoff)
            .order_by(_SAGAS.c.updated_at)
            .limit(limit)
        )
        with database.translating():
            keys = [(row[0], row[1]) for row in (await tx.execute(chosen)).all()]
            if not keys:
                return 0
            await tx.execute(sa.delete(_LOG).where(sa.tuple_(_LOG.c.saga, _LOG.c.instance_id).in_(keys)))
            await tx.execute(sa.delete(_SAGAS).where(sa.tuple_(_SAGAS.c.saga, _SAGAS.c.id).in_(keys)))
        return len(keys)

    async def counts(self, tx: AsyncSession) -> dict[tuple[str, str], int]:
        """How many instances each ``(saga, status)`` has."""
        query = sa.select(_SAGAS.c.saga, _SAGAS.c.status, sa.func.count()).group_by(_SAGAS.c.saga, _SAGAS.c.status)
        return {(row[0], row[1]): int(row[2]) for row in (await tx.execute(query)).all()}
