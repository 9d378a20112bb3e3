"""``/readyz`` is not green while a process stalls: hung handlers, a database that takes no writes, a stuck relay.

Each test runs a whole process assembly (``app.serve``) in this event loop
with a short ``CONVEYOR_STALL_AFTER`` and asks its ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from conveyor import Context, envelope, errors, every, on, registry, settings
from conveyor.runtime import app
from conveyor.testing import unique, wait_for
from conveyor.testing.brokers import free_port
from conveyor.transports.memory import MemoryTransport
from relay_helpers import wait_until
from sqlalchemy.engine import make_url

from event_store import Database, Outbox

STALL_AFTER = 2.0


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}/readyz")
    return response.status_code, response.json()


@contextlib.asynccontextmanager
async def process(handlers: registry.Registry, parts: app.Parts, **overrides: Any) -> AsyncIterator[int]:
    """Run ``app.serve`` in this loop; yield its HTTP port once ``/readyz`` has answered 200."""
    port = free_port()
    config = settings.load(
        service="stalls", http_host="127.0.0.1", http_port=port, console=False, drain_timeout=0.5,
        stall_after=STALL_AFTER, **overrides,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(config, handlers, parts, stop))
    try:
        async with asyncio.timeout(30):
            while True:
                if task.done():
                    task.result()
                with contextlib.suppress(httpx.HTTPError):
                    if (await readyz(port))[0] == 200:
                        break
                await asyncio.sleep(0.1)
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


async def metrics_text(port: int) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics")).text


def metric(text: str, name: str, handler: str | None = None) -> float:
    """The value of sample ``name`` (of ``handler``, if given) in a Prometheus exposition."""
    wanted = name if handler is None else f'{name}{{handler="{handler}"}}'
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {wanted} in /metrics")


async def publish(url: str, topic: str, count: int) -> None:
    producer = MemoryTransport(url)
    await producer.connect()
    for n in range(count):
        await producer.publish(topic, envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), "ce-"))
    await producer.close()


async def unready(port: int, check: str, within: float = 15.0) -> dict[str, Any]:
    """Wait until ``/readyz`` answers 503 with ``check`` failing; return that check's details."""
    seen: list[tuple[int, dict[str, Any]]] = []

    async def failing() -> bool:
        seen[:] = [await readyz(port)]
        status, body = seen[0]
        return status == 503 and not body["checks"].get(check, {}).get("ok", True)

    await wait_until(failing, within, f"/readyz to fail on {check!r}")
    return dict(seen[0][1]["checks"][check])


@contextlib.contextmanager
def write_locked(sqlite_url: str) -> Iterator[None]:
    """Another connection holds the SQLite file's write lock (readers still read), as a long writer would."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        # The process under test takes the write lock too (briefly, but a busy machine stretches it): wait for it.
        connection = sqlite3.connect(str(make_url(sqlite_url).database), isolation_level=None, timeout=30)
        connection.execute("BEGIN IMMEDIATE")
        held.set()
        release.wait(60)
        connection.execute("ROLLBACK")
        connection.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(35), "could not take the SQLite write lock in 30 s"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


async def test_a_worker_whose_every_slot_hangs_is_not_ready_and_names_the_handler() -> None:
    topic, name = unique("hung"), unique("hung")
    never = asyncio.Event()

    @on(topic, name=name, concurrency=2, timeout=None)
    async def hang(payload: dict) -> None:
        await never.wait()

    url = f"memory://{unique('hung')}"
    async with process(registry.Registry.of(hang), app.Parts(worker=True), broker_url=url, database_url="none") as port:
        await publish(url, topic, 5)
        check = await unready(port, "progress")
        held = metric(await metrics_text(port), "conveyor_oldest_in_hand_seconds", name)
        never.set()
        await wait_until(lambda: readyz_ok(port), 15, "/readyz healthy again once the handler returns")
    assert name in check["error"] and "in hand" in check["error"]
    assert held > STALL_AFTER


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_a_worker_whose_database_takes_no_writes_is_not_ready(db_url: str) -> None:
    topic, name = unique("db"), unique("db")
    done: list[int] = []

    @on(topic, name=name, concurrency=2, timeout=1.0)  # may hold a message 2 s (STALL_AFTER, twice its timeout)
    async def record(payload: dict, ctx: Context) -> None:
        async with ctx.transaction():
            pass
        done.append(payload["n"])

    url = f"memory://{unique('db')}"
    async with process(
        registry.Registry.of(record), app.Parts(worker=True), broker_url=url, database_url=db_url
    ) as port:
        with write_locked(db_url):
            await publish(url, topic, 3)
            check = await unready(port, "progress")
        await wait_for(lambda: len(done) == 3, 30, "the held messages, once the database takes writes")
        await wait_until(lambda: readyz_ok(port), 15, "/readyz healthy again")
    assert name in check["error"]


async def readyz_ok(port: int) -> bool:
    status, body = await readyz(port)
    return status == 200 and body["status"] == "healthy"


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_a_relay_whose_rounds_keep_failing_is_not_ready(db_url: str) -> None:
    database = Database(db_url)
    async with database.transaction() as session:
        await Outbox().add(session, "stalls.audit", {"n": 1})
    await database.close()

    class Broken(MemoryTransport):
        async def publish_many(self, messages: Any) -> Any:  # a bug in an adapter, not an outage
            raise RuntimeError("adapter bug")

    url = f"memory://{unique('relay')}"
    with mock_transport(url, Broken):
        async with process(registry.Registry(), app.Parts(worker=False, relay=True), broker_url=url,
                           database_url=db_url) as port:  # fmt: skip
            check = await unready(port, "relay")
    assert "stalled" in check["error"]


@contextlib.contextmanager
def mock_transport(url: str, cls: type[MemoryTransport]) -> Iterator[None]:
    from unittest import mock

    from conveyor import transports

    original = transports.create

    def create(wanted: str, *args: Any, **kwargs: Any) -> Any:
        return cls(wanted) if wanted == url else original(wanted, *args, **kwargs)

    with mock.patch.object(transports, "create", create):
        yield


@pytest.mark.serial  # beside the parallel suite the lock holder starved for 30 s (twice, in fresh clones)
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_a_scheduler_that_cannot_claim_its_fires_is_not_ready(db_url: str) -> None:
    @every(timedelta(seconds=1), name=unique("tick"))
    def tick() -> None:
        return None

    url = f"memory://{unique('sched')}"
    async with process(registry.Registry.of(tick), app.Parts(worker=False, scheduler=True), broker_url=url,
                       database_url=db_url) as port:  # fmt: skip
        with write_locked(db_url):
            check = await unready(port, "scheduler")
            age = metric(await metrics_text(port), "conveyor_scheduler_last_tick_age_seconds")
        await wait_until(lambda: readyz_ok(port), 15, "/readyz healthy again")
    assert "has not completed a tick" in check["error"] and age > STALL_AFTER


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_a_database_that_hangs_past_the_handler_timeout_spends_no_attempt(db_url: str) -> None:
    topic, name = unique("hang"), unique("hang")
    attempts: list[int] = []

    @on(topic, name=name, timeout=0.5, max_attempts=2)
    async def record(payload: dict, ctx: Context) -> None:
        async with ctx.transaction():  # the inbox claim waits for the write lock past the timeout
            attempts.append(ctx.message.attempt)

    url = f"memory://{unique('hang')}"
    async with process(registry.Registry.of(record), app.Parts(worker=True), broker_url=url, database_url=db_url):
        with write_locked(db_url):
            await publish(url, topic, 1)
            await asyncio.sleep(2.5)  # five handler timeouts: each would spend an attempt if blamed on the message
        await wait_for(lambda: bool(attempts), 15, "the message, once the database takes writes")
    assert attempts == [1]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_ingest_alone_stays_ready_through_a_broker_outage_and_says_so(db_url: str) -> None:
    class Unreachable(MemoryTransport):
        down = False

        async def check(self) -> None:
            if Unreachable.down:
                raise errors.TransientTransportError("the broker is unreachable (test)")

    url = f"memory://{unique('ingest')}"
    with mock_transport(url, Unreachable):
        parts = app.Parts(worker=False, ingest=True)
        async with process(registry.Registry(), parts, broker_url=url, database_url=db_url) as port:
            Unreachable.down = True
            status, body = await readyz(port)
    # Ingest writes to the outbox only: it still accepts events, so it stays ready, degraded, naming the broker.
    assert (status, body["status"], body["checks"]["broker"]["ok"]) == (200, "degraded", False)
