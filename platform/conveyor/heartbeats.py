"""Live worker processes: each process of a deployment beats into the service's database; the console lists them.

Every process with a database writes one row, its :class:`Heartbeat`, every
:data:`EVERY` (host, pid, roles, handlers, messages in flight) and deletes it
when it stops cleanly. A row not renewed for :data:`GONE_AFTER_BEATS` beats is
shown as gone (the process crashed, was killed, or lost its database), and is
purged after :data:`PURGE_AFTER_BEATS`. Ages are measured on the database
clock, so hosts with skewed clocks agree (as for schedule claims).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

EVERY = timedelta(seconds=5)
"""How often a process beats."""
GONE_AFTER_BEATS = 3
"""Beats missed before a process is shown as gone."""
PURGE_AFTER_BEATS = 120
"""Beats missed before a gone process's row is deleted (ten minutes at the default pace)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one process reports of itself.

    Attributes:
        id: unique per process start (host, pid and a random part: a pid is reused).
        service: the service's name.
        host: the host name (a container's is its id).
        pid: the process id on that host.
        roles: what the process runs (``worker``, ``relay``, ``scheduler``, ``ingest``).
        handlers: the handlers it consumes for.
        in_flight: messages its handlers hold now.
        started_at: when the process started (aware UTC).
    """

    id: str
    service: str
    host: str
    pid: int
    roles: tuple[str, ...]
    handlers: tuple[str, ...]
    in_flight: int
    started_at: datetime


@dataclass(frozen=True, slots=True)
class Seen:
    """A process's latest heartbeat, as read from the database.

    Attributes:
        heartbeat: what it reported.
        beat_at: when it last beat (database clock).
        age: how long ago, when read (database clock).
    """

    heartbeat: Heartbeat
    beat_at: datetime
    age: timedelta

    @property
    def gone(self) -> bool:
        """Whether it missed :data:`GONE_AFTER_BEATS` beats: crashed, killed or cut off."""
        return self.age > EVERY * GONE_AFTER_BEATS


class HeartbeatStore(Protocol):
    """The processes' heartbeats, in the service's database."""

    async def beat(self, heartbeat: Heartbeat) -> None:
        """Write ``heartbeat`` (insert or replace the row of its id), stamped with the database's time.

        Only the process itself writes its row, so two writers never race on it.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def seen(self) -> list[Seen]:
        """Every process's latest heartbeat, most recent first.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def leave(self, id: str) -> None:  # noqa: A002 - the heartbeat's id
        """Delete a process's row (it stops cleanly); nothing when there is none.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def purge(self, older_than: timedelta) -> int:
        """Delete the rows of processes silent for longer than ``older_than``; return how many.

        Raises:
            StoreError: the database failed.
        """
        ...
