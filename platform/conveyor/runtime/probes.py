"""Probes of the dependencies an outage is blamed on: does the database, does the broker answer now?

A hold (a message kept without spending an attempt, see :mod:`conveyor.fate`)
needs proof that the dependency is down: its probe fails. The proof must be
newer than the failure it judges: a caller passes ``since`` (the loop time of
its failure), and only a probe started then or later answers it, so a result
from just before an outage began never blames the message. Many messages that
fail together share one probe (a probe started after each of their failures),
and a result is reused for at most ``ttl`` seconds; a probe that does not
answer within ``timeout`` seconds failed (a frozen network never answers).
Times are the event loop's clock.
"""

from __future__ import annotations

import asyncio
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
        self._results: dict[fate.Dependency, tuple[float, bool]] = {}  # dependency -> (probe start, answered)
        self._running: dict[fate.Dependency, tuple[float, asyncio.Future[bool]]] = {}

    async def healthy(self, dependency: fate.Dependency | None, since: float | None = None) -> bool | None:
        """True if the dependency answers its probe, False if not, None without a probe (or a dependency).

        Args:
            dependency: the dependency to probe.
            since: loop time of the failure being judged: only a probe started
                then or later answers (default: now, minus ``ttl``).
        """
        if dependency is None or self._checks[dependency] is None:
            return None
        now = asyncio.get_running_loop().time()
        oldest = since if since is not None else now - self._ttl
        oldest = max(oldest, now - self._ttl)
        cached = self._results.get(dependency)
        if cached is not None and cached[0] >= oldest:
            return cached[1]
        running = self._running.get(dependency)
        if running is None or running[0] < oldest:
            future = asyncio.ensure_future(self._probe(dependency, now))
            running = (now, future)
            self._running[dependency] = running
            future.add_done_callback(lambda done: self._forget(dependency, done))
        return await asyncio.shield(running[1])

    def _forget(self, dependency: fate.Dependency, done: asyncio.Future[bool]) -> None:
        running = self._running.get(dependency)
        if running is not None and running[1] is done:
            del self._running[dependency]

    async def _probe(self, dependency: fate.Dependency, started: float) -> bool:
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
        latest = self._results.get(dependency)
        if latest is None or latest[0] <= started:
            self._results[dependency] = (started, answered)
        return answered
