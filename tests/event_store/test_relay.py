"""The outbox relay: publish with confirmation, then mark sent; order, delays, crashes, backoff."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from conveyor import envelope, errors
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.testing import wait_for
from relay_helpers import TOPIC, Broker, PublishEach
from relay_helpers import add as _add
from relay_helpers import unsent as _unsent

from event_store import Database, SqlOutboxStore, models

Running = list[tuple[asyncio.Task[None], asyncio.Event, Relay]]


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    """Relays started by a test; stopped, awaited and their stores closed at teardown."""
    tasks: Running = []
    yield tasks
    for _, stop, _ in tasks:
        stop.set()
    await asyncio.gather(*(task for task, _, _ in tasks), return_exceptions=True)
    for _, _, relay in tasks:
        await relay.store.close()


def _start(relay: Relay, tasks: Running) -> asyncio.Task[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    tasks.append((task, stop, relay))
    return task


async def test_relay_publishes_committed_rows_and_marks_them_sent(db: Database, broker: Broker) -> None:
    ids = await _add(db, 5)
    relay = Relay(SqlOutboxStore(db, listen=False), broker.transport)
    result = await relay.run_once()
    assert (result.published, broker.ids(), await _unsent(db)) == (5, ids, 0)


async def test_relay_publishes_ce_headers_in_transport_binding(db: Database, broker: Broker) -> None:
    await _add(db, 1, key="k")
    await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    message = broker.collector.received[0].message
    assert (message.headers["ce-type"], message.key, message.headers["content-type"]) == (
        TOPIC,
        "k",
        "application/json",
    )


class _IdleStore(SqlOutboxStore):
    """Tells when the relay went idle: it is waiting for a commit (or its poll interval)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits = 0

    async def wait(self, max_wait: float) -> None:
        self.waits += 1
        await super().wait(max_wait)

    @property
    def listening(self) -> bool:
        """The LISTEN connection is up: a commit of another process now wakes the relay."""
        return self._listener is not None and self._listener.listening


async def test_relay_run_wakes_on_commit_without_waiting_for_poll(
    db: Database, broker: Broker, running: Running
) -> None:
    store = _IdleStore(db)
    _start(Relay(store, broker.transport, options=RelayOptions(poll_interval=30.0)), running)
    await wait_for(lambda: store.waits >= 1, 10, "the relay to go idle")
    await _add(db, 1)
    await broker.collector.wait(1, timeout=5.0)


async def test_relay_listen_notify_wakes_relay_of_other_process(
    pg_db: Database, broker: Broker, running: Running
) -> None:
    other = Database(pg_db.url)  # another "process": no in-process signal reaches it
    try:
        store = _IdleStore(other)
        _start(Relay(store, broker.transport, options=RelayOptions(poll_interval=30.0)), running)
        await wait_for(lambda: store.waits >= 1 and store.listening, 10, "the relay to LISTEN and go idle")
        await _add(pg_db, 1)
        await broker.collector.wait(1, timeout=5.0)
    finally:
        for task, stop, relay in running:
            stop.set()
            await task
            await relay.store.close()
        running.clear()
        await other.close()


@pytest.mark.parametrize("after", [0.002, 0.005, 0.01])
async def test_outbox_store_wait_cancelled_while_opening_listen_leaks_no_connection(
    pg_db: Database, after: float
) -> None:
    # A relay stopped during its first idle wait cancels the wait mid-connect;
    # the pg_db fixture fails the test if a connection is left open.
    store = SqlOutboxStore(pg_db)
    waiting = asyncio.create_task(store.wait(5.0))
    await asyncio.sleep(after)  # lands the cancellation inside the LISTEN connection's set-up
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await store.close()


async def test_relay_keeps_per_key_order_across_failures(db: Database, broker: Broker) -> None:
    await _add(db, 3, key="k")
    store = SqlOutboxStore(db, listen=False)
    async with store.claim(10) as batch:  # the first row of the key fails
        batch.failed(batch.messages[0], "broker said no", 0.0)
    await Relay(store, broker.transport).run_once()
    assert broker.by_key()["k"] == [0, 1, 2]


async def test_relay_failed_keyed_row_holds_back_later_rows_of_key(db: Database, broker: Broker) -> None:
    await _add(db, 3, key="k")
    await _add(db, 1, key="other", start=10)
    store = SqlOutboxStore(db, listen=False)
    async with store.claim(10) as batch:
        batch.failed(batch.messages[0], "broker said no", 3600.0)
    await Relay(store, broker.transport).run_once()
    assert dict(broker.by_key()) == {"other": [10]}


async def test_relay_delayed_row_not_claimed_before_available_at(db: Database, broker: Broker) -> None:
    await _add(db, 1, delay=3600)
    result = await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    assert (result.claimed, await _unsent(db)) == (0, 1)


async def test_relay_delayed_row_published_once_due(db: Database, broker: Broker, running: Running) -> None:
    started = time.monotonic()
    await _add(db, 1, delay=1.0)
    _start(Relay(SqlOutboxStore(db), broker.transport, options=RelayOptions(poll_interval=30.0)), running)
    received = await broker.collector.wait(1, timeout=10.0)
    assert received[0].at - started >= 0.95


async def test_relay_delayed_keyless_row_does_not_block_others(db: Database, broker: Broker) -> None:
    await _add(db, 1, delay=3600)
    await _add(db, 1, start=1)
    await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    assert broker.by_key()[""] == [1]


async def test_relay_delayed_keyed_row_does_not_hold_back_its_key(db: Database, broker: Broker) -> None:
    await _add(db, 1, key="k", delay=3600)
    await _add(db, 1, key="k", start=1)
    await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    assert broker.by_key()["k"] == [1]


class _DownTransport(PublishEach):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls = 0

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        self.calls += 1
        raise errors.TransientTransportError("broker unreachable")

    async def check(self) -> None:
        raise errors.TransientTransportError("broker unreachable")


async def test_relay_broker_down_backs_off_without_spending_attempts(db: Database, broker: Broker) -> None:
    await _add(db, 1)
    transport = _DownTransport(broker.url)
    stop = asyncio.Event()
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=RelayOptions(retry_base=0.05, max_backoff=0.5))
    task = asyncio.create_task(relay.run(stop))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 1.5)
    stop.set()
    await task
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(models.outbox))).one()
    assert 2 <= transport.calls <= 10  # retried, but no hot loop
    assert (row.attempts, row.parked_at, row.sent_at, "broker unreachable" in row.last_error) == (0, None, None, True)


class _FlakyAnswering(_DownTransport):
    """Fails every publish as if unreachable, yet answers its probe: not an outage, the row's own failure."""

    async def check(self) -> None:
        return None


async def test_relay_transient_failures_while_the_broker_answers_spend_attempts_and_park(
    db: Database, broker: Broker
) -> None:
    await _add(db, 1)
    transport = _FlakyAnswering(broker.url)
    options = RelayOptions(retry_base=0.01, retry_max=0.02, max_backoff=0.05, max_attempts=3, poll_interval=0.05)
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=options)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await wait_for(lambda: transport.calls >= 6, 10, "three attempts, each tried once more after the probe")
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await task
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(models.outbox))).one()
    assert (transport.calls, row.attempts, row.parked_at is not None) == (6, 3, True)


async def test_relay_holds_a_row_through_an_outage_only_up_to_the_hold_limit(db: Database, broker: Broker) -> None:
    await _add(db, 1)
    transport = _DownTransport(broker.url)  # down for good, and its probe says so
    options = RelayOptions(
        retry_base=0.01, retry_max=0.02, max_backoff=0.05, max_attempts=2, poll_interval=0.05, hold_limit=0.5
    )
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=options)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))

    async def parked() -> bool:
        async with db.transaction(readonly=True) as session:
            return (await session.execute(sa.select(models.outbox.c.parked_at))).scalar_one() is not None

    try:
        deadline = asyncio.get_running_loop().time() + 15
        while not await parked():
            assert asyncio.get_running_loop().time() < deadline, "the row was held past the hold limit"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert transport.calls > 2  # held without spending attempts first, then two attempts


class _HangAfterPublish(PublishEach):
    """Delivers the message, then never confirms: the relay dies before marking it sent."""

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        await super().publish(topic, message)
        await asyncio.Event().wait()


async def test_relay_killed_after_publish_republishes_same_id_on_restart(db: Database, broker: Broker) -> None:
    # In-process version of the crash point relay.after-publish; the subprocess
    # version is test_relay_crash_point_exits_before_mark_sent.
    [message_id] = await _add(db, 1)
    hanging = _HangAfterPublish(broker.url)
    await hanging.connect()
    dying = SqlOutboxStore(db, listen=False)
    task = asyncio.create_task(Relay(dying, hanging).run(asyncio.Event()))
    await broker.collector.wait(1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await dying.close()  # a dead process's relay lock (SQLite) goes with it
    assert await _unsent(db) == 1
    await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    assert broker.ids() == [message_id, message_id]
    assert await _unsent(db) == 0


_CRASHING_RELAY = """
import asyncio, sys
from conveyor.runtime.relay import Relay
from conveyor.transports.memory import MemoryTransport
from event_store import Database, SqlOutboxStore

async def main():
    db = Database(sys.argv[1])
    transport = MemoryTransport("memory://crash")
    await transport.connect()
    await Relay(SqlOutboxStore(db), transport).run_once()
    print("survived")

asyncio.run(main())
"""


async def test_relay_crash_point_exits_before_mark_sent(db: Database, broker: Broker) -> None:
    [message_id] = await _add(db, 1)
    env = {**os.environ, "CONVEYOR_CRASH_AT": "relay.after-publish"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_RELAY, db.url.render_as_string(hide_password=False),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, out) == (70, b""), err.decode()
    assert await _unsent(db) == 1
    result = await Relay(SqlOutboxStore(db, listen=False), broker.transport).run_once()
    assert result.published == 1, result
    await broker.collector.wait(1)  # the memory broker delivers in a task of its own
    assert broker.ids() == [message_id]


async def test_relay_three_relays_publish_each_message_once_in_key_order(pg_db: Database, broker: Broker) -> None:
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        await _add(pg_db, 40, key=key)
    await _add(pg_db, 60)
    total = 6 * 40 + 60
    databases = [Database(pg_db.url) for _ in range(3)]
    stores = [SqlOutboxStore(d, per_key=4) for d in databases]
    relays = [Relay(s, broker.transport, options=RelayOptions(batch_size=10, poll_interval=0.05)) for s in stores]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        await wait_for(lambda: len(broker.collector.received) >= total, 60, f"{total} messages")
    finally:
        stop.set()
        await asyncio.gather(*tasks)  # each relay finishes its round: every publish is done
        for store, database in zip(stores, databases, strict=True):
            await store.close()
            await database.close()
    # Any late duplicate is in the broker's FIFO queue ahead of this marker.
    marker = envelope.create(TOPIC, {"n": -1}, source="t")
    await broker.transport.publish(TOPIC, envelope.to_binary(marker, broker.transport.binary_prefix))
    await wait_for(lambda: marker.id in broker.ids(), 10, "the marker behind every publish")
    assert broker.ids()[-1] == marker.id
    del broker.collector.received[-1]  # the marker is not one of the relays' messages
    ids = broker.ids()
    assert len(ids) == len(set(ids)) == total
    lanes = broker.by_key()
    assert all(lanes[key] == list(range(40)) for key in keys), {k: lanes[k][:10] for k in keys}
