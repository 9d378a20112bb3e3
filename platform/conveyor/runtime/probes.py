"""Probes of the dependencies an outage is blamed on: does the database, does the broker answer now?

A hold (a message kept without spending an attempt, see :mod:`conveyor.fate`)
needs proof that the dependency is down: its probe fails. Many messages held
at once share one probe: a result is reused for ``ttl`` seconds and only one
probe of a dependency runs at a time; a probe that does not answer within
``timeout`` seconds failed (a frozen network never answers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from conveyor import fate

Check = Callable[[], Awaitable[None]]
"""Raises if the dependency does not answer now (``Database.check``, ``Transport.check``)."""

PROBE_TIMEOUT = 2.0
PROBE_TTL = 1.0


class Probes:
    """The probes of one process's database and broker.

    Args:
        database: checks the database; None where the process has none.
        broker: checks the broker; None where the process has none.
        timeout: seconds a probe may take before it counts as failed.
        ttl: seconds a probe's result is reused.
    """

    def __init__(
        self,
        database: Check | None = None,
        broker: Check | None = None,
        *,
        timeout: float = PROBE_TIMEOUT,
        ttl: float = PROBE_TTL,
    ) -> None:
        self._checks = {fate.Dependency.DATABASE: database, fate.Dependency.BROKER: broker}
        self._timeout = timeout
        self._ttl = ttl
        self._results: dict[fate.Dependency, tuple[float, bool]] = {}
        self._running: dict[fate.Dependency, asyncio.Future[bool]] = {}

    async def healthy(self, dependency: fate.Dependency | None) -> bool | None:
        """True if the dependency answers its probe, False if not, None without a probe (or a dependency)."""
        if dependency is None or self._checks[dependency] is None:
            return None
        cached = self._results.get(dependency)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        running = self._running.get(dependency)
        if running is None:
            running = asyncio.ensure_future(self._probe(dependency))
            self._running[dependency] = running
            running.add_done_callback(lambda _: self._running.pop(dependency, None))
        return await asyncio.shield(running)

    async def _probe(self, dependency: fate.Dependency) -> bool:
        check = self._checks[dependency]
        assert check is not None
        try:
            async with asyncio.timeout(self._timeout):
                await check()
            answered = True
        except asyncio.CancelledError:
            raise
        except Exception:  # any failure of the probe is the answer "down"
            answered = False
        self._results[dependency] = (time.monotonic(), answered)
        return answered
