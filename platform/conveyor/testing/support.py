"""Helpers for tests of Conveyor components: unique names, deadlines, collectors."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from conveyor import ports
from conveyor.envelope import WireMessage

_ISSUED: set[str] = set()
_TOKEN = re.compile(r"(?<![0-9a-f])[0-9a-f]{12}(?![0-9a-f])")


def unique(prefix: str = "t") -> str:
    """A name no other test uses: ``<prefix>.<12 hex digits>``.

    The hex token is remembered, so that :func:`issued_here` can tell broker
    objects this process named (queues, topics) from everyone else's.
    """
    token = uuid.uuid4().hex[:12]
    _ISSUED.add(token)
    return f"{prefix}.{token}"


def issued_here(name: str) -> bool:
    """True if ``name`` contains a token that :func:`unique` returned in this process.

    Matches whatever a broker object was named after the unique name
    (``conveyor.<name>``, ``conveyor-binding.<name>``, ``conveyor.<topic>.dlq``, ...).
    """
    return any(token in _ISSUED for token in _TOKEN.findall(name))


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


async def remains(condition: Callable[[], bool], duration: float, what: str = "condition") -> None:
    """Check that ``condition`` stays true for ``duration`` seconds (a negative check).

    For "nothing more happens" assertions, where there is no event to wait
    for: the window is a sleep, so keep it as short as it can be while a
    failure would still show within it. Fails as soon as the condition is false.

    Raises:
        AssertionError: the condition was false at some point of the window.
    """
    started = time.monotonic()
    while True:
        if not condition():
            elapsed = time.monotonic() - started
            raise AssertionError(f"{what}: no longer true after {elapsed:.2f}s of a {duration}s window")
        if time.monotonic() - started >= duration:
            return
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
        try:
            await wait_for(lambda: len(self.received) >= count, timeout, f"{count} deliveries")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc} (got {len(self.received)}: {[b[:40] for b in self.bodies()[:10]]!r})"
            ) from None
        return self.received
