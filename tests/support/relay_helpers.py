"""Helpers for outbox relay tests: a recording memory broker, outbox rows, fake transports, running relays."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from conveyor import envelope, errors, ports
from conveyor.runtime.relay import Relay
from conveyor.testing import Collector, unique
from conveyor.transports.memory import MemoryTransport

from event_store import Database, Outbox, models

TOPIC = "relay.test"


@dataclass
class Broker:
    """A memory broker with one subscription on TOPIC that records every delivery."""

    url: str
    transport: MemoryTransport
    collector: Collector = field(default_factory=Collector)

    def ids(self) -> list[str]:
        """Message ids received, in arrival order."""
        return [r.message.message_id or "" for r in self.collector.received]

    def by_key(self) -> dict[str, list[int]]:
        """The ``n`` of each received message, per key ("" for keyless), in arrival order."""
        lanes: dict[str, list[int]] = defaultdict(list)
        for r in self.collector.received:
            event = envelope.decode(r.message)
            lanes[event.partitionkey or ""].append(event.json()["n"])
        return lanes


@contextlib.asynccontextmanager
async def open_broker() -> AsyncIterator[Broker]:
    """A connected memory broker with its recording subscription; closed on exit."""
    url = f"memory://{unique('relay')}"
    transport = MemoryTransport(url)
    await transport.connect()
    subscription = ports.Subscription(name=unique("sub"), topic=TOPIC, prefetch=100_000)
    result = Broker(url, transport)
    await transport.subscribe(subscription, result.collector)
    try:
        yield result
    finally:
        await transport.close()


async def add(
    db: Database, count: int, *, key: str | None = None, start: int = 0, topic: str = TOPIC, **kw: Any
) -> list[str]:
    """Commit ``count`` outbox rows ``{"n": start..}`` on ``topic``; return their message ids."""
    async with db.transaction() as session:
        return [(await Outbox().add(session, topic, {"n": start + n}, key=key, **kw)).id for n in range(count)]


async def unsent(db: Database) -> int:
    """Outbox rows not marked sent."""
    async with db.transaction(readonly=True) as session:
        query = sa.select(sa.func.count()).select_from(models.outbox).where(models.outbox.c.sent_at.is_(None))
        return int((await session.execute(query)).scalar_one())


async def row(db: Database, message_id: str) -> sa.Row[Any]:
    """The outbox row of ``message_id``."""
    async with db.transaction(readonly=True) as session:
        query = sa.select(models.outbox).where(models.outbox.c.message_id == message_id)
        return (await session.execute(query)).one()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll the async ``check`` until it is true.

    Raises:
        AssertionError: it is still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def attempts(db: Database, message_id: str) -> int:
    """Failed publish attempts recorded on the row of ``message_id``."""
    return int((await row(db, message_id)).attempts)


class PublishEach(MemoryTransport):
    """A memory transport whose ``publish_many`` calls ``self.publish`` per message, in order.

    The relay publishes with ``publish_many``; a fake that overrides ``publish``
    derives from this so that its override still decides each message's fate.
    """

    async def publish_many(self, messages: Sequence[tuple[str, envelope.WireMessage]]) -> list[Exception | None]:
        results: list[Exception | None] = []
        for topic, message in messages:
            try:
                await self.publish(topic, message)
            except errors.TransportError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results


class Refusing(PublishEach):
    """Refuses (non-transient :class:`TransportError`) every message whose key is in ``refused``."""

    def __init__(self, url: str, refused: set[str]) -> None:
        super().__init__(url)
        self.refused = refused

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        if message.key in self.refused:
            raise errors.TransportError(f"the broker refused a message with key {message.key}")
        await super().publish(topic, message)


class Flaky(PublishEach):
    """Raises ``error()`` instead of publishing while ``failing(message)`` is true; counts publish calls.

    With ``down``, the broker's probe (``check``) fails while ``down()`` is true: an outage, not a refusal.
    """

    def __init__(
        self,
        url: str,
        failing: Callable[[envelope.WireMessage], bool],
        error: Callable[[], Exception],
        down: Callable[[], bool] | None = None,
    ):
        super().__init__(url)
        self.failing = failing
        self.error = error
        self.down = down
        self.calls = 0

    async def check(self) -> None:
        if self.down is not None and self.down():
            raise errors.TransientTransportError("the broker is unreachable (test)")
        await super().check()

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        self.calls += 1
        if self.failing(message):
            raise self.error()
        await super().publish(topic, message)


async def connected(transport: MemoryTransport) -> MemoryTransport:
    """``transport`` after ``connect()``."""
    await transport.connect()
    return transport


class Relays:
    """Relays started by a test; :meth:`stop_all` stops them, awaits them and closes their stores."""

    def __init__(self) -> None:
        self.running: list[tuple[asyncio.Task[None], asyncio.Event, Relay]] = []

    def start(self, relay: Relay) -> asyncio.Task[None]:
        """Run ``relay`` in a task until stopped."""
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        self.running.append((task, stop, relay))
        return task

    async def stop(self, relay: Relay) -> None:
        """Stop one relay and close its store."""
        for entry in list(self.running):
            task, stop, started = entry
            if started is relay:
                stop.set()
                await asyncio.wait([task])  # Relay.run never raises; a test that cares checks the task
                await relay.store.close()
                self.running.remove(entry)

    async def stop_all(self) -> None:
        """Stop every relay still running and close their stores."""
        for _, _, relay in list(self.running):
            await self.stop(relay)
