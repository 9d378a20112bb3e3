"""A broker the test draws from, for sagas run through the production path (HandlerRunner, unit of work, relay)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from conveyor import envelope, registry
from conveyor.runtime import app
from conveyor.runtime.handling import HandlerRunner
from conveyor.runtime.relay import Relay
from relay_helpers import PublishEach

from event_store import Database


class Pool(PublishEach):
    """A broker that keeps what is published for the test to deliver."""

    def __init__(self) -> None:
        super().__init__("memory://pool")
        self.pending: list[tuple[str, envelope.WireMessage]] = []

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        self.pending.append((topic, message))


class Delivery:
    """One delivery of a message; records how the runner settled it."""

    def __init__(self, topic: str, message: envelope.WireMessage, attempt: int) -> None:
        self.topic, self.message, self.attempt = topic, message, attempt
        self.settled: str | None = None

    async def ack(self) -> None:
        self.settled = "ack"

    async def nack(self, delay: float) -> None:
        self.settled = "nack"


class Harness:
    """Runs a saga and its participants on ``db``: the relay publishes to a :class:`Pool`, the test delivers.

    A nacked delivery is delivered again at once with the next attempt number;
    messages of topics no handler takes (dead letters) are kept in ``dead``;
    messages of the topics in ``held`` stay pending until the test removes the topic.
    """

    def __init__(self, db: Database, *handlers: Any) -> None:
        self.stores = app.stores_for(db, "t")
        self.pool = Pool()
        self.runners = {
            h.topic: HandlerRunner(h, self.pool, source="t", max_message_bytes=1 << 20, transactions=self.stores.units)
            for h in registry.Registry.of(*handlers).handlers
        }
        self.relay = Relay(self.stores.relay_store(), self.pool)
        self.dead: list[tuple[str, envelope.WireMessage]] = []
        self.settled: list[tuple[str, str | None]] = []
        self.held: set[str] = set()
        self.db = db

    async def deliver_one(self) -> bool:
        """Publish what is due, then deliver the oldest pending message; False if nothing was pending."""
        await self.relay.run_once()
        ready = [n for n, (topic, _) in enumerate(self.pool.pending) if topic not in self.held]
        if not ready:
            return False
        topic, message = self.pool.pending.pop(ready[0])
        runner = self.runners.get(topic)
        if runner is None:
            self.dead.append((topic, message))
            return True
        attempt = 1 + sum(1 for t, _ in self.settled if t == f"{topic}:{message.message_id}")
        delivery = Delivery(topic, message, attempt)
        await runner.process(delivery)
        self.settled.append((f"{topic}:{message.message_id}", delivery.settled))
        if delivery.settled == "nack":
            self.pool.pending.append((topic, message))
        return True

    async def run_until(self, done: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
        """Deliver messages until ``done()``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not await done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            if not await self.deliver_one():
                await asyncio.sleep(0.02)  # a delayed message (a timer) is not due yet

    def pending(self, topic: str) -> list[envelope.WireMessage]:
        """Messages of ``topic`` waiting for delivery."""
        return [message for t, message in self.pool.pending if t == topic]

    def nacks(self) -> int:
        """Deliveries settled by a nack (a retry)."""
        return sum(1 for _, settled in self.settled if settled == "nack")

    async def status(self, saga: str, instance: str) -> str | None:
        """The instance's status, or None."""
        async with self.db.transaction(readonly=True) as session:
            record = await self.stores.sagas.load(session, saga, instance)
        return None if record is None else record.instance.status.value

    async def history(self, saga: str, instance: str) -> list[str]:
        """The events of the instance's step log."""
        async with self.db.transaction(readonly=True) as session:
            return [h.entry.event for h in await self.stores.sagas.history(session, saga, instance)]

    async def close(self) -> None:
        """Close the relay's store."""
        await self.relay.store.close()
