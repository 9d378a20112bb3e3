"""Operators' view of the outbox: list, show, retry and purge rows (``conveyor outbox ...``).

Parked rows (see :mod:`event_store.outbox_store`) wait for one of these. A
retried row is due at once with no attempts spent, and it goes first among
its key's rows; a purged parked row is gone, and its key's later rows follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import sqlalchemy as sa
from conveyor import errors, stores

from event_store import database, models
from event_store.outbox import as_utc

_UNSENT = models.outbox.c.sent_at.is_(None)
_PARKED = sa.and_(_UNSENT, models.outbox.c.parked_at.is_not(None))
NOT_YET_DUE = sa.and_(models.outbox.c.parked_at.is_(None), models.outbox.c.available_at > models.utcnow())
"""Of the unsent rows, those scheduled: unparked and not due yet (delayed, or backing off after a failure)."""


def _entry(row: sa.Row[Any]) -> stores.OutboxEntry:
    status: stores.OutboxStatus = "sent" if row.sent_at is not None else "parked" if row.parked_at else "pending"
    message = stores.OutboxMessage(
        id=row.id,
        message_id=row.message_id,
        topic=row.topic,
        key=row.partition_key,
        headers=row.headers,
        body=row.body,
        attempts=row.attempts,
        created_at=as_utc(row.created_at),
    )
    return stores.OutboxEntry(
        message=message,
        status=status,
        available_at=as_utc(row.available_at),
        last_error=row.last_error,
        parked_at=None if row.parked_at is None else as_utc(row.parked_at),
        sent_at=None if row.sent_at is None else as_utc(row.sent_at),
    )


async def entries(
    db: database.Database,
    *,
    status: Literal["pending", "parked"] | None = None,
    topic: str | None = None,
    limit: int = 100,
) -> list[stores.OutboxEntry]:
    """Unsent rows in outbox order, at most ``limit``; only ``status`` and ``topic`` ones if given.

    Raises:
        StoreError: the database failed.
    """
    table = models.outbox
    query = sa.select(table).where(_UNSENT).order_by(table.c.id).limit(limit)
    if status == "parked":
        query = query.where(table.c.parked_at.is_not(None))
    elif status == "pending":
        query = query.where(table.c.parked_at.is_(None))
    if topic is not None:
        query = query.where(table.c.topic == topic)
    async with db.transaction(readonly=True) as session:
        return [_entry(row) for row in (await session.execute(query)).all()]


async def topics(db: database.Database, limit: int = 1000) -> list[stores.TopicBacklog]:
    """Unsent, parked, due and scheduled rows per topic, every topic with unsent rows, by name, at most ``limit``.

    Raises:
        StoreError: the database failed.
    """
    table = models.outbox
    query = (
        sa.select(
            table.c.topic, sa.func.count(), sa.func.count(table.c.parked_at), sa.func.count(sa.case((NOT_YET_DUE, 1)))
        )
        .where(_UNSENT)
        .group_by(table.c.topic)
        .order_by(table.c.topic)
        .limit(limit)
    )
    async with db.transaction(readonly=True) as session:
        rows = (await session.execute(query)).all()
    return [
        stores.TopicBacklog(topic, int(unsent), int(parked), int(unsent) - int(parked) - int(later), int(later))
        for topic, unsent, parked, later in rows
    ]


async def get(db: database.Database, message_id: str) -> stores.OutboxEntry:
    """The row of ``message_id``, sent or not.

    Raises:
        NotFound: no row has this message id.
        StoreError: the database failed.
    """
    table = models.outbox
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(table).where(table.c.message_id == message_id))).one_or_none()
    if row is None:
        raise errors.NotFound(f"no outbox message with id {message_id!r}")
    return _entry(row)


async def _require(session: Any, message_ids: Sequence[str], condition: sa.ColumnElement[bool], what: str) -> None:
    table = models.outbox
    query = sa.select(table.c.message_id).where(condition, table.c.message_id.in_(message_ids))
    found = set((await session.execute(query)).scalars())
    missing = [m for m in message_ids if m not in found]
    if missing:
        raise errors.NotFound(f"no {what} outbox message with id {', '.join(repr(m) for m in missing)}")


async def retry(db: database.Database, message_ids: Sequence[str] | None) -> int:
    """Make unsent rows due now with no attempts, un-parking them (None: every parked row).

    Raises:
        NotFound: a given id is not an unsent row; nothing was changed.
        StoreError: the database failed.
    """
    table = models.outbox
    async with db.transaction() as session:
        if message_ids is None:
            condition: sa.ColumnElement[bool] = _PARKED
        else:
            wanted = list(dict.fromkeys(message_ids))
            await _require(session, wanted, _UNSENT, "unsent")
            condition = sa.and_(_UNSENT, table.c.message_id.in_(wanted))
        result = await session.execute(
            sa.update(table).where(condition).values(attempts=0, parked_at=None, available_at=models.utcnow())
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def purge_parked(db: database.Database, message_ids: Sequence[str] | None) -> int:
    """Delete parked rows (None: every parked row); return how many.

    Raises:
        NotFound: a given id is not a parked row; nothing was deleted.
        StoreError: the database failed.
    """
    table = models.outbox
    async with db.transaction() as session:
        condition: sa.ColumnElement[bool] = _PARKED
        if message_ids is not None:
            wanted = list(dict.fromkeys(message_ids))
            await _require(session, wanted, _PARKED, "parked")
            condition = sa.and_(_PARKED, table.c.message_id.in_(wanted))
        result = await session.execute(sa.delete(table).where(condition))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
