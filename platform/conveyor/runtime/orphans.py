"""A supervised worker stops when its supervisor is gone.

``conveyor worker --processes N`` starts its children in sessions of their own
(the supervisor drains them itself on SIGTERM), so a supervisor killed
outright (``kill -9``, an OOM kill) would leave them running unsupervised,
and a restarted supervisor would start N more beside them. Each child is
given its supervisor's pid; once its parent is no longer that process, the
child drains and stops as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger("conveyor")

SUPERVISOR_PID_ENV = "_CONVEYOR_SUPERVISOR_PID"
"""Set by the supervisor in each child's environment (not a setting: no ``CONVEYOR_`` prefix)."""

_POLL_SECONDS = 1.0


async def stop_when_orphaned(stop: asyncio.Event) -> None:
    """Set ``stop`` once this process's supervisor is gone; returns at once when not supervised."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if not supervisor:
        return
    while not stop.is_set():
        if os.getppid() != int(supervisor):
            log.warning("the supervisor (pid %s) is gone; stopping as on SIGTERM", supervisor)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _POLL_SECONDS)
