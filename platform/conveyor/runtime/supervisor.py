"""``conveyor worker --processes N``: N worker processes on one host, kept running.

The supervisor starts N copies of ``conveyor worker`` with the settings it
resolved (exported as ``CONVEYOR_*`` variables, so every child sees exactly the
same configuration), restarts a child that dies (with backoff, so a crash loop
does not spin), and on SIGTERM/SIGINT passes the signal on and waits for the
children to drain, killing any still running after the drain deadline.

HTTP: the supervisor serves ``/healthz``, ``/readyz`` and ``/metrics`` on the
configured port; ``/readyz`` is healthy when every child is running and reports
ready, and ``/metrics`` is the aggregate of all children (scrape this one).
Child ``i`` (1-based) serves its own ``/healthz``, ``/readyz`` and ``/metrics``
(its share only) on ``port + i``; with port 0 HTTP is off everywhere.

Metrics use prometheus_client's multiprocess mode: every child starts with
``PROMETHEUS_MULTIPROC_DIR`` naming a directory of the supervisor's (a fresh
temporary one, removed at exit; or the operator's ``PROMETHEUS_MULTIPROC_DIR``,
whose ``*.db`` files are removed at start, as prometheus_client requires), and
writes its metrics there; the supervisor sums them. A dead child's counters
and histograms stay in the aggregate (so they never go backwards across a
restart); its ``live*`` gauges are dropped (``mark_process_dead``). Each
gauge's ``multiprocess_mode`` says how it is combined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
from prometheus_client import multiprocess

from conveyor import errors
from conveyor.runtime import app, http, orphans
from conveyor.settings import ENV_PREFIX, Settings

log = logging.getLogger("conveyor.supervisor")

_RESTART_MIN = 0.5
_RESTART_MAX = 30.0
_STABLE_AFTER = 60.0
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class _Child:
    index: int
    port: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restart_delay: float = _RESTART_MIN
    restarts: int = field(default=0)


def child_environment(settings: Settings, port: int) -> dict[str, str]:
    """The environment of a child: the parent's plus every resolved setting."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            env.pop(f"{ENV_PREFIX}{name.upper()}", None)
            continue
        if name == "ingest_token":
            value = settings.ingest_token.get_secret_value() if settings.ingest_token else ""
        elif isinstance(value, tuple | list):
            value = ",".join(value)
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    env[f"{ENV_PREFIX}HTTP_PORT"] = str(port)
    return env


class Supervisor:
    """Runs and watches ``processes`` worker processes.

    Args:
        settings: resolved settings, passed to every child.
        processes: how many worker processes to run (at least 1).
    """

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes < 1:
            raise errors.ConfigurationError(f"--processes must be at least 1, got {processes}")
        self._settings = settings
        base = settings.http_port
        self._children = [_Child(i, base + i if base else 0) for i in range(1, processes + 1)]
        self._stopping = False
        self._metrics_dir = ""

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Run until SIGTERM/SIGINT (or ``stop``); return the exit code (0 if every child drained)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = None
        operator_dir = os.environ.get(_MULTIPROC_ENV) or None
        self._metrics_dir = _metrics_directory(operator_dir)
        try:
            for child in self._children:
                await self._start(child)
            if self._settings.http_port:
                checks = [http.Check(f"worker-{c.index}", self._probe(c)) for c in self._children]
                registry = prometheus_client.CollectorRegistry()
                multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
                site = http.create_app(checks, version=app.version_info(self._settings), registry=registry)
                server = http.HttpServer(site, self._settings.http_host, self._settings.http_port)
                await server.start()
            watchers = [asyncio.create_task(self._watch(child)) for child in self._children]
            log.info("supervising %d worker processes", len(self._children))
            await stop.wait()
            self._stopping = True
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            return await self._shutdown()
        finally:
            if server is not None:
                await server.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if operator_dir is None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    async def _start(self, child: _Child) -> None:
        command = [sys.executable, "-m", "conveyor.cli", "worker"]
        env = child_environment(self._settings, child.port)
        # Read by prometheus_client when the child imports it: it must be in the environment at start.
        env[_MULTIPROC_ENV] = self._metrics_dir
        env[orphans.SUPERVISOR_PID_ENV] = str(os.getpid())  # the child stops if this process dies
        child.process = await asyncio.create_subprocess_exec(*command, env=env, start_new_session=True)
        child.started_at = time.monotonic()
        log.info("started worker %d (pid %d)", child.index, child.process.pid)

    async def _watch(self, child: _Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            self._mark_dead(child.process.pid)
            if self._stopping:
                return
            ran = time.monotonic() - child.started_at
            if ran > _STABLE_AFTER:
                child.restart_delay = _RESTART_MIN
            log.error(
                "worker %d (pid %d) exited with %d; restarting in %.1fs",
                child.index,
                child.process.pid,
                code,
                child.restart_delay,
            )
            await asyncio.sleep(child.restart_delay)
            child.restart_delay = min(child.restart_delay * 2, _RESTART_MAX)
            child.restarts += 1
            await self._start(child)

    async def _shutdown(self) -> int:
        running = [c.process for c in self._children if c.process and c.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = self._settings.drain_timeout + 10
        try:
            async with asyncio.timeout(deadline):
                codes = [await p.wait() for p in running]
        except TimeoutError:
            log.error("workers still running %.0fs after SIGTERM; killing them", deadline)
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            return 1
        for process in running:
            self._mark_dead(process.pid)
        log.info("all workers stopped")
        return 0 if all(code == 0 for code in codes) else 1

    def _mark_dead(self, pid: int) -> None:
        """Drop a dead child's ``live*`` gauges from the aggregate; its counters stay."""
        multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _probe(self, child: _Child) -> Callable[[], Awaitable[None]]:
        async def probe() -> None:
            if child.process is None or child.process.returncode is not None:
                raise errors.ConveyorError(f"worker {child.index} is not running")
            if child.port and (status := await _get_status("127.0.0.1", child.port, "/readyz")) != 200:
                raise errors.ConveyorError(f"worker {child.index} is not ready (readyz answered {status})")

        return probe

    @property
    def pids(self) -> list[int]:
        """Process ids of the running children."""
        return [c.process.pid for c in self._children if c.process and c.process.returncode is None]


def _metrics_directory(operator_dir: str | None) -> str:
    """The directory the children write their metrics to: the operator's, emptied, else a new temporary one."""
    if operator_dir is None:
        return tempfile.mkdtemp(prefix="conveyor-metrics-")
    directory = Path(operator_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # Files of an earlier run would be summed with this one's (prometheus_client: wipe it between runs).
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    return str(directory)


async def _get_status(host: str, port: int, path: str) -> int:
    """HTTP status of ``GET path`` on a local child (0 when it does not answer)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
