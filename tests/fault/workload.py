"""Driving a fault scenario: the ``faultapp`` processes, the load, and waiting on the ledger.

A :class:`Scenario` owns a fresh migrated PostgreSQL database with the ledger
table, a unique topic and handler name, and every ``conveyor`` process it
starts (logs in the test's temporary directory); closing it stops them and
drops the database. Load goes in either straight to the broker
(:func:`publish`, as another service would) or through the outbox
(:func:`seed_outbox`, published by a ``conveyor relay``: the production path,
which retries through a broker outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import databases
import httpx
import ledger
import sqlalchemy as sa
from cli import Process, free_port, run
from conveyor import Publisher
from conveyor.testing import unique
from conveyor.testing.brokers import with_query
from conveyor.transports.nats import NatsTransport

from event_store import Database, Outbox
from event_store.database import normalize_url

KAFKA_OPTIONS = "partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400"
"""Kafka consumer tuning for the fault tier (as the transport's own tests on Tansu use).

A SIGKILLed member sends no LeaveGroup: its partitions sit idle until the
session timeout drops it. With the default 10 s, plus Tansu holding a JoinGroup
for about half the session timeout, a kill would stall those partitions ~15 s;
with 2 s (heartbeats every 0.4 s) about 3 s.
"""


def keys(n: int) -> str:
    """The ordering key of message ``n``: 64 keys, so keys run concurrently and share partitions."""
    return f"k{n % 64}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str] = str) -> None:
    """Poll ``condition`` every 0.1 s until it holds; fail naming ``what`` (and the logs) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not the case after {timeout:.0f}s\n{logs()}")
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels`` in a ``/metrics`` body (labels in any order); 0 when absent."""
    for line in text.splitlines():
        found = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if found and found.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', found.group(2))) == labels:
            return float(found.group(3))
    return 0.0


async def _publish(url: str, topic: str, numbers: Sequence[int]) -> None:
    async with Publisher(url, source="fault") as publisher:
        for start in range(0, len(numbers), 50):
            chunk = numbers[start : start + 50]
            await asyncio.gather(*(publisher.publish(topic, {"n": n}, key=keys(n)) for n in chunk))


def publish(url: str, topic: str, numbers: Iterable[int]) -> None:
    """Publish ``{"n": n}`` for each number straight to the broker (confirmed), 50 at a time."""
    asyncio.run(_publish(url, topic, list(numbers)))


async def _seed(url: str, topic: str, numbers: Sequence[int]) -> None:
    database = Database(url)
    try:
        async with database.transaction() as session:
            for n in numbers:
                await Outbox("fault").add(session, topic, {"n": n}, key=keys(n))
    finally:
        await database.close()


def seed_outbox(url: str, topic: str, numbers: Iterable[int]) -> None:
    """Commit ``{"n": n}`` for each number to the outbox of the database at ``url``, in one transaction."""
    asyncio.run(_seed(url, topic, list(numbers)))


async def _nats_ack_wait(url: str, handler: str) -> float:
    import nats
    from conveyor.transports.nats_wire import durable_name

    client = await nats.connect(url)
    try:
        info = await client.jetstream().consumer_info(NatsTransport(url).stream, durable_name(handler))
    finally:
        await client.close()
    assert info.config.ack_wait is not None
    return float(info.config.ack_wait)


class Scenario:
    """One scenario's database, names and ``conveyor`` processes.

    Args:
        tmp_path: where the application module and the process logs go.
        broker_url: the broker every process uses unless told otherwise.
        **app_env: more ``FAULT_*`` settings of the application (``FAULT_TIMEOUT``...).
    """

    def __init__(self, tmp_path: Path, broker_url: str, **app_env: str) -> None:
        self.tmp_path = tmp_path
        self.broker_url = broker_url
        self.database_url = databases.create("postgres")
        ledger.create_ledger(self.database_url)
        self.topic, self.handler = unique("fault"), unique("fault")
        self.env = {
            **ledger.write_app(tmp_path), "FAULT_TOPIC": self.topic, "FAULT_HANDLER": self.handler,
            "CONVEYOR_DATABASE_URL": self.database_url, "CONVEYOR_BROKER_URL": broker_url, **app_env,
        }  # fmt: skip
        self.processes: dict[str, Process] = {}
        self._engine = sa.create_engine(normalize_url(self.database_url, sync=True))

    def start(self, name: str, args: list[str], **env: str) -> Process:
        """Start ``conveyor <args>`` as process ``name`` (log ``<name>.log``), with ``env`` over the scenario's."""
        process = Process(args, self.tmp_path / f"{name}.log", cwd=self.tmp_path, **{**self.env, **env})
        self.processes[name] = process
        return process

    def worker(self, name: str, wait: bool = True, **env: str) -> tuple[Process, int]:
        """Start a ``conveyor worker`` serving HTTP on a free port; wait until it is ready unless told not to."""
        port = free_port()
        process = self.start(name, ["worker", "--port", str(port)], **env)
        if wait:
            process.wait_ready(port, timeout=60)
        return process, port

    def relay(self, name: str = "relay", **env: str) -> Process:
        """Start a ``conveyor relay`` (no HTTP server)."""
        return self.start(name, ["relay", "--port", "0"], **env)

    def handled(self) -> int:
        """Distinct messages with an effect in the ledger so far."""
        with self._engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT count(DISTINCT n) FROM ledger")).scalar_one())

    def wait_handled(self, count: int, timeout: float) -> None:
        """Wait until ``count`` distinct messages have an effect."""
        wait_until(lambda: self.handled() >= count, timeout, f"{count} messages handled", self.logs)

    def finish(self, count: int, timeout: float) -> float | None:
        """Wait until ``count`` messages have an effect, then 1 s more for a late duplicate to land.

        Returns:
            None when every message was handled; otherwise the time (epoch seconds) it gave up,
            so that the scenario still reports what the ledger shows (the lost, the stall so far).
        """
        deadline = time.monotonic() + timeout
        while self.handled() < count:
            if time.monotonic() > deadline:
                return time.time()
            time.sleep(0.1)
        time.sleep(1.0)
        return None

    def effects(self) -> list[tuple[int, float]]:
        """The ledger (see :func:`ledger.effects`)."""
        return ledger.effects(self.database_url)

    def nats_ack_wait(self) -> float:
        """The ``ack_wait`` of the handler's durable consumer, as the worker declared it on the NATS server.

        It bounds how long the server waits before redelivering what a dead worker held.
        """
        return asyncio.run(_nats_ack_wait(self.broker_url, self.handler))

    def dead_letters(self) -> str:
        """``conveyor dlq list TOPIC``: the topic's dead letters, kept by the broker (and the database)."""
        listed = run(["dlq", "list", self.topic], cwd=self.tmp_path, **self.env)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return str(listed.stdout)

    def metrics(self, port: int) -> str:
        """A worker's ``/metrics`` body."""
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    def logs(self, lines: int = 40) -> str:
        """The tail of every process log, for failure messages."""
        parts = []
        for name, process in self.processes.items():
            tail = "\n".join(process.text().splitlines()[-lines:])
            parts.append(f"--- {name} (exit {process.popen.poll()}) ---\n{tail}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every process still running (SIGTERM, then SIGKILL) and drop the database."""
        for process in self.processes.values():
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # one that does not drain is killed below
                process.popen.wait(15)
            process.close()
        self._engine.dispose()
        databases.drop(self.database_url)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stall(rows: Sequence[tuple[int, float]], since: float, gave_up: float | None) -> float:
    """:func:`ledger.longest_stall` after ``since``, counting the wait from the last effect to ``gave_up`` if any."""
    longest = ledger.longest_stall(rows, since)
    if gave_up is None:
        return longest
    last = max((at for _, at in rows if at >= since), default=since)
    return max(0.0 if longest == float("inf") else longest, gave_up - last)


def kafka(url: str) -> str:
    """The session's Kafka URL with :data:`KAFKA_OPTIONS`."""
    return with_query(url, KAFKA_OPTIONS)
