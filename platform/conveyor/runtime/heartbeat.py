"""The process's heartbeat: its :class:`~conveyor.heartbeats.Heartbeat` written every few seconds, deleted at stop.

A database outage is waited out (logged once, beating resumes with the
database); the row then ages, and the console shows the process as gone until
it beats again. Each beat also purges the rows of processes silent for
:data:`~conveyor.heartbeats.PURGE_AFTER_BEATS` beats, so a crashed process's
row does not stay for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from conveyor import errors, heartbeats, registry

log = logging.getLogger("conveyor.heartbeat")

Snapshot = Callable[[], heartbeats.Heartbeat]
"""Returns the process's heartbeat now; must not block."""


def process_id() -> str:
    """A new id for this process start: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


Load = Callable[[], Sequence[tuple[registry.Handler, int, int]]]
"""``(handler, capacity, in_flight)`` per handler of the worker (:meth:`conveyor.runtime.worker.Worker.load`)."""


def snapshot_of(service: str, roles: Sequence[str], load: Load | None) -> Snapshot:
    """This process's snapshot function: fixed identity and start time; handlers and in flight read at each beat.

    Args:
        service: the service's name.
        roles: what the process runs.
        load: the worker's load, where the process has a worker.
    """
    identity, host, pid, started = process_id(), socket.gethostname(), os.getpid(), datetime.now(UTC)

    def snapshot() -> heartbeats.Heartbeat:
        handled = [] if load is None else load()
        names = tuple(handler.name for handler, _, _ in handled)
        in_flight = sum(n for _, _, n in handled)
        return heartbeats.Heartbeat(identity, service, host, pid, tuple(roles), names, in_flight, started)

    return snapshot


class Beater:
    """Writes the process's heartbeat until stopped.

    Args:
        store: where heartbeats go.
        snapshot: the process's heartbeat now.
        every: the pace (:data:`conveyor.heartbeats.EVERY`; shorter in tests).
    """

    def __init__(
        self, store: heartbeats.HeartbeatStore, snapshot: Snapshot, every: timedelta = heartbeats.EVERY
    ) -> None:
        self._store = store
        self._snapshot = snapshot
        self._every = every.total_seconds()

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every ``every`` until ``stop`` is set; then delete the row.

        Raises:
            Exception: a bug (anything but a :class:`~conveyor.errors.StoreError`) propagates.
        """
        identity: str | None = None
        failing = False
        try:
            while not stop.is_set():
                heartbeat = self._snapshot()
                identity = heartbeat.id
                try:
                    await self._store.beat(heartbeat)
                    await self._store.purge(heartbeats.EVERY * heartbeats.PURGE_AFTER_BEATS)
                except (errors.StoreError, OSError) as exc:  # an outage (a reset the driver let through too)
                    if not failing:
                        log.warning("heartbeat not written (the console shows this process as gone): %s", exc)
                    failing = True
                else:
                    if failing:
                        log.info("heartbeat written again")
                    failing = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._every):
                        await stop.wait()
        finally:
            if identity is not None:
                try:
                    await self._store.leave(identity)
                except (errors.StoreError, OSError) as exc:  # the row ages and is shown as gone, then purged
                    log.warning("heartbeat row not deleted at stop: %s", exc)
