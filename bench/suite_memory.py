"""Resident memory of a worker process against a raw aiormq consumer process (the client under Conveyor's transport).

Both processes consume one RabbitMQ queue and are measured once ready (the
raw one once consuming, ``conveyor worker`` once ``/readyz`` answers 200):
``VmRSS`` from ``/proc``. The worker runs a one-handler app, once without a
database (``CONVEYOR_DATABASE_URL=none``: what the raw consumer does) and
once on SQLite (migrated beforehand), as a worker with the inbox would.

Run alone: ``.venv/bin/python -m bench.suite_memory [--runs 3]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bench import harness, raw_clients

RABBIT = raw_clients.DEFAULT_RABBIT_URL
CONVEYOR = Path(sys.executable).with_name("conveyor")

RAW_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    import aiormq

    async def main():
        connection = await aiormq.connect(sys.argv[1])
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=100)
        await channel.queue_declare(sys.argv[2], auto_delete=True)

        async def on_message(message):
            await message.channel.basic_ack(message.delivery.delivery_tag)

        await channel.basic_consume(sys.argv[2], on_message)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)

APP = textwrap.dedent(
    """
    from conveyor import on

    @on("bench.rss", name="bench.rss")
    async def noop(payload: bytes) -> None:
        return None
    """
)


def rss_mb(pid: int) -> float:
    """The process's resident set size in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def raw_rss() -> float:
    """RSS of the raw aiormq consumer once it consumes."""
    process = subprocess.Popen(
        [sys.executable, "-c", RAW_CONSUMER, RABBIT, raw_clients.unique_name("bench-rss")], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == b"ready", line
        time.sleep(1)
        return rss_mb(process.pid)
    finally:
        _stop(process)


def worker_rss(directory: Path, database: bool) -> float:
    """RSS of ``conveyor worker`` running a one-handler app, once ready (on SQLite, or without a database)."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(directory),
        "CONVEYOR_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'conveyor.db'}" if database else "none",
        "CONVEYOR_APP": "rss_app",
        "CONVEYOR_BROKER_URL": RABBIT,
    }
    process = subprocess.Popen([str(CONVEYOR), "worker", "--port", str(port)], env=env, cwd=directory)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("the worker never became ready")
        time.sleep(1)
        return rss_mb(process.pid)
    finally:
        _stop(process)


@contextlib.asynccontextmanager
async def suite() -> AsyncIterator[Sequence[harness.Row]]:
    """The RSS row (a scratch directory with the app and its migrated database)."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        (directory / "rss_app.py").write_text(APP)
        env = {**os.environ, "CONVEYOR_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'conveyor.db'}"}
        await asyncio.to_thread(
            subprocess.run, [str(CONVEYOR), "db", "upgrade"], env=env, check=True, capture_output=True
        )
        yield [
            harness.Row(
                f"worker RSS, {'SQLite' if database else 'no database'}",
                lambda: asyncio.to_thread(raw_rss),
                lambda database=database: asyncio.to_thread(worker_rss, directory, database),  # type: ignore[misc]
                goal=0.0,
                unit="MB",
                higher_is_better=False,
                budget=30.0,
                note="raw: aiormq consumer process (basic_consume, prefetch 100, ack each); "
                "Conveyor: `conveyor worker`, one handler"
                + (
                    ", SQLite (SQLAlchemy's async engine and ORM session: ~34 MB)"
                    if database
                    else ", CONVEYOR_DATABASE_URL=none"
                ),
            )
            for database in (False, True)
        ]


if __name__ == "__main__":
    harness.main_for(suite)
