"""Waiting for dead letters to be listed, bounded by a deadline rather than a number of peeks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from conveyor import ports, registry
from conveyor.runtime import dead_letters
from conveyor.runtime.worker import Worker
from conveyor.testing import Collector, unique

Open = Callable[[], Awaitable[ports.Transport]]


async def peek_until(
    open_transport: Open, topic: str, count: int = 1, *, within: float = 45.0, idle: float = 1.0
) -> list[dead_letters.DeadLetter]:
    """The dead letters of ``topic`` once ``count`` are listed, or the last listing after ``within`` s.

    Each listing uses a fresh transport, closed afterwards, so what it peeked goes back to the broker.
    On Kafka a listing joins a consumer group first: a fixed number of listings can outlast a test's
    timeout on a slow broker, a deadline cannot.
    """
    deadline = time.monotonic() + within
    while True:
        peeker = await open_transport()
        try:
            listed = await dead_letters.peek(peeker, topic, idle=idle)
        finally:
            await peeker.close()
        if len(listed) >= count or time.monotonic() >= deadline:
            return listed
        await asyncio.sleep(0.1)  # an empty keeper answers at once: let the worker run before the next look


async def worker_with_dead_letters(transport: ports.Transport, handler: object) -> tuple[Worker, Collector]:
    """Start a worker of ``handler`` (one decorated function) on a connected ``transport``.

    Returns the worker and a collector of its topic's dead letters.
    """
    handlers = registry.Registry.of(handler).handlers  # type: ignore[arg-type]
    worker = Worker(handlers, transport, source="t")
    await worker.declare()
    dead = Collector()
    subscription = ports.Subscription(name=unique("dlq"), topic=handlers[0].topic + ".dlq")
    await transport.declare([], [subscription])
    await transport.subscribe(subscription, dead)
    await worker.start()
    return worker, dead
