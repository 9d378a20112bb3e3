"""PostgreSQL LISTEN on a dedicated asyncpg connection, to wake relays when rows commit.

A trigger on the outbox (see the initial migration) runs ``pg_notify`` for
every inserting statement; PostgreSQL delivers the notification when the
inserting transaction commits, and never for one that rolls back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy.engine import URL

log = logging.getLogger("conveyor.event_store.listener")


class PgListener:
    """Keeps a LISTEN connection open and sets ``signal`` on each notification.

    The connection is opened lazily by :meth:`ensure` and reopened after it
    drops (at most every ``retry_interval`` seconds); while it is down callers
    simply poll.

    Args:
        url: the database URL (any PostgreSQL driver name).
        channel: the channel to LISTEN on.
        signal: the event to set.
    """

    def __init__(self, url: URL, channel: str, signal: asyncio.Event, retry_interval: float = 5.0) -> None:
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._channel = channel
        self._signal = signal
        self._retry_interval = retry_interval
        self._connection: Any = None
        self._next_attempt = 0.0

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is open."""
        return self._connection is not None and not self._connection.is_closed()

    def _notified(self, *_args: object) -> None:
        self._signal.set()

    async def ensure(self) -> bool:
        """Open the LISTEN connection if it is not open; return whether it is. Never raises."""
        if self.listening:
            return True
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + self._retry_interval
        await self.close()
        import asyncpg  # only on PostgreSQL (the `postgres` extra); SQLite installs need not have it

        try:
            connection = await asyncpg.connect(self._dsn, timeout=5.0)
            await connection.add_listener(self._channel, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("cannot LISTEN on %s (%s); polling instead", self._channel, exc)
            return False
        self._connection = connection
        # Rows may have committed while no one listened: wake the caller once.
        self._signal.set()
        return True

    async def close(self) -> None:
        """Close the connection; idempotent."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            import asyncpg  # a connection exists, so the driver is installed

            try:
                await connection.close(timeout=2.0)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                connection.terminate()
