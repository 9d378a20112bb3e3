"""Waiting for dead letters to be listed, bounded by a deadline rather than a number of peeks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from conveyor import ports
from conveyor.runtime import dead_letters

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
