"""Retention: deleting inbox rows and schedule run history older than ``CONVEYOR_RETENTION``.

Sent outbox rows are purged by the relay itself with the same retention. The
inbox must keep a message's row longer than any redelivery of it can take
(broker retention, retry budget), or a late duplicate would run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from conveyor import errors, persistence

log = logging.getLogger("conveyor.housekeeping")


async def purge_once(stores: persistence.Persistence, retention: timedelta) -> tuple[int, int]:
    """Delete old inbox rows and finished schedule runs; return how many of each.

    Raises:
        StoreError: the database failed.
    """
    inbox = await stores.inbox.purge(retention)
    async with stores.database.transaction() as tx:
        runs = await stores.schedules.purge(tx, retention)
    return inbox, runs


async def run(
    stores: persistence.Persistence, retention: timedelta, stop: asyncio.Event, interval: float = 300.0
) -> None:
    """Purge every ``interval`` seconds until ``stop`` is set; failures are logged and retried next time."""
    while not stop.is_set():
        try:
            inbox, runs = await purge_once(stores, retention)
            if inbox or runs:
                log.info("purged %d inbox rows and %d schedule runs older than %s", inbox, runs, retention)
        except errors.StoreError as exc:
            log.warning("housekeeping failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
