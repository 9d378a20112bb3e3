"""Delayed one-off messages from code outside handlers."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from conveyor import envelope, errors

from event_store.outbox import Outbox

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


async def schedule_at(
    session: AsyncSession,
    topic: str,
    data: Any,
    *,
    at: datetime | None = None,
    delay: timedelta | float | None = None,
    key: str | None = None,
    source: str = "conveyor",
) -> envelope.Envelope:
    """Have a message delivered to ``topic``'s handlers at ``at`` (or after ``delay``).

    The message is a durable outbox row written in the caller's transaction
    (``session``): it exists if and only if that transaction commits, survives
    restarts, and is released by the relay when due (by the database clock).

    Raises:
        ConfigurationError: neither or both of ``at`` and ``delay``, a naive
            ``at``, an invalid topic or unserialisable data.
        StoreError: the database refused the row.
    """
    if (at is None) == (delay is None):
        raise errors.ConfigurationError("schedule_at needs exactly one of at= or delay=")
    return await Outbox(source).add(session, topic, data, key=key, at=at, delay=delay)
