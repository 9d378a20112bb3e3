"""Retention: deleting inbox rows, schedule run history and finished sagas once they are old enough.

Inbox rows and finished schedule runs are kept ``CONVEYOR_RETENTION``;
finished saga instances (``completed``, ``compensated``) and their step logs
``CONVEYOR_SAGA_RETENTION`` after their last change. Sent outbox rows are
purged by the relay itself with ``CONVEYOR_RETENTION``. The inbox must keep a
message's row longer than any redelivery of it can take (broker retention,
retry budget), or a late duplicate would run again; likewise a saga's start
event redelivered after its finished instance is purged starts it again, and
a reply arriving after that is dead-lettered (no such instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from conveyor import errors, persistence

log = logging.getLogger("conveyor.housekeeping")

SAGA_CHUNK = 1000
"""Finished saga instances deleted per transaction."""


@dataclass(frozen=True, slots=True)
class Purged:
    """What one pass deleted: inbox rows, schedule runs, saga instances (each with its step log)."""

    inbox: int = 0
    runs: int = 0
    sagas: int = 0

    def __bool__(self) -> bool:
        return bool(self.inbox or self.runs or self.sagas)


async def purge_once(
    stores: persistence.Persistence, retention: timedelta, *, saga_retention: timedelta | None = None
) -> Purged:
    """Delete old inbox rows, finished schedule runs and finished sagas; say how many of each.

    Args:
        stores: the service's stores.
        retention: age of the inbox rows and schedule runs deleted.
        saga_retention: age (since their last change) of the finished saga
            instances deleted; ``retention`` if None.

    Raises:
        StoreError: the database failed.
    """
    inbox = await stores.inbox.purge(retention)
    async with stores.database.transaction() as tx:
        runs = await stores.schedules.purge(tx, retention)
    sagas = 0
    while True:
        async with stores.database.transaction() as tx:
            deleted = await stores.sagas.purge(tx, saga_retention or retention, SAGA_CHUNK)
        sagas += deleted
        if deleted < SAGA_CHUNK:
            return Purged(inbox, runs, sagas)


async def run(
    stores: persistence.Persistence,
    retention: timedelta,
    stop: asyncio.Event,
    interval: float = 300.0,
    *,
    saga_retention: timedelta | None = None,
) -> None:
    """Purge every ``interval`` seconds until ``stop`` is set; failures are logged and retried next time."""
    while not stop.is_set():
        try:
            purged = await purge_once(stores, retention, saga_retention=saga_retention)
            if purged:
                log.info(
                    "purged %d inbox rows and %d schedule runs older than %s, %d finished sagas older than %s",
                    purged.inbox, purged.runs, retention, purged.sagas, saga_retention or retention,
                )  # fmt: skip
        except errors.StoreError as exc:
            log.warning("housekeeping failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
