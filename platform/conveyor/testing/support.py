"""Helpers for tests of Conveyor components: unique names, deadlines, collectors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from conveyor import ports
from conveyor.envelope import WireMessage


def unique(prefix: str = "t") -> str:
    """A name no other test uses: ``<prefix>.<12 hex digits>``."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true.

    Raises:
        AssertionError: it is still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Received:
    """One delivery seen by a :class:`Collector`, with when it arrived."""

    message: WireMessage
    attempt: int
    at: float
    delivery: ports.Delivery


@dataclass
class Collector:
    """A delivery callback that records deliveries and settles them per ``settle``.

    Attributes:
        settle: what to do with each delivery (default: ack it at once).
        received: every delivery, in arrival order.
    """

    settle: Callable[[ports.Delivery], Awaitable[None]] | None = None
    received: list[Received] = field(default_factory=list)

    async def __call__(self, delivery: ports.Delivery) -> None:
        self.received.append(Received(delivery.message, delivery.attempt, time.monotonic(), delivery))
        if self.settle is None:
            await delivery.ack()
        else:
            await self.settle(delivery)

    def bodies(self) -> list[bytes]:
        """Bodies received, in arrival order."""
        return [r.message.body for r in self.received]

    async def wait(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least ``count`` deliveries arrived; return them."""
        await wait_for(lambda: len(self.received) >= count, timeout, f"{count} deliveries (got {len(self.received)})")
        return self.received
