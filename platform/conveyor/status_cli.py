"""``conveyor status``: every handler's backlog on the broker, without starting a worker.

It connects to the broker, asks for the backlog of the same subscriptions a
worker would declare (it declares nothing), and disconnects; no database is
opened. A handler whose subscription was never declared (no worker started
yet), or whose broker did not answer in time, shows ``-`` and its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor import cli_options, errors, ports, registry, settings, transports
from conveyor.runtime import scheduler, worker

TIMEOUT = 10.0
"""Seconds the backlog of one subscription may take."""


@dataclass(frozen=True, slots=True)
class Row:
    """One handler's line of ``conveyor status``.

    Attributes:
        handler: the handler name.
        topic: its topic.
        capacity: its concurrency in one worker process.
        backlog: the broker's figures, or None when they could not be read.
        error: why they could not, if so.
    """

    handler: str
    topic: str
    capacity: int
    backlog: ports.Backlog | None
    error: str | None = None

    def cells(self) -> tuple[str, ...]:
        """The row as table cells: name, topic, backlog, oldest age, capacity."""
        backlog = self.backlog
        pending = "-" if backlog is None else str(backlog.pending)
        age = "-" if backlog is None or backlog.oldest_age_s is None else f"{backlog.oldest_age_s:.1f}s"
        return (self.handler, self.topic, pending, age, str(self.capacity))

    def as_json(self) -> dict[str, object]:
        """The row as a JSON object (the shape of one handler in ``GET /scaling``, plus ``error``)."""
        backlog = self.backlog
        return {
            "handler": self.handler,
            "topic": self.topic,
            "capacity": self.capacity,
            "backlog": None if backlog is None else backlog.pending,
            "broker_in_flight": None if backlog is None else backlog.in_flight,
            "oldest_age_seconds": None if backlog is None else backlog.oldest_age_s,
            "error": self.error,
        }


HEADER = ("NAME", "TOPIC", "BACKLOG", "OLDEST AGE", "CAPACITY")


def handlers_of(found: registry.Registry) -> list[registry.Handler]:
    """The handlers a worker of this application runs: its own and its schedules' jobs."""
    return [*found.handlers, *scheduler.job_handlers(found.schedules, None)]


async def read(
    transport: ports.Transport, handlers: Sequence[registry.Handler], concurrency: int, timeout: float = TIMEOUT
) -> list[Row]:
    """The backlog of every handler's subscription, read concurrently from a connected transport."""
    plan = worker.Worker(handlers, transport, source="conveyor-status", concurrency=concurrency)
    loads = plan.load()

    async def one(subscription: ports.Subscription, capacity: int) -> Row:
        try:
            async with asyncio.timeout(timeout):
                backlog = await ports.backlog_of(transport, subscription)
        except TimeoutError:
            return Row(subscription.name, subscription.topic, capacity, None, f"no answer within {timeout:g}s")
        except errors.TransportError as exc:
            return Row(subscription.name, subscription.topic, capacity, None, str(exc))
        reason = None if backlog is not None else "this broker reports no backlog"
        return Row(subscription.name, subscription.topic, capacity, backlog, reason)

    subscriptions = plan.subscriptions()
    return list(
        await asyncio.gather(*(one(s, capacity) for s, (_, capacity, _) in zip(subscriptions, loads, strict=True)))
    )


async def status(config: settings.Settings, found: registry.Registry) -> list[Row]:
    """Connect to the configured broker, read every handler's backlog, disconnect.

    Raises:
        ConfigurationError: the broker is ``memory://`` (it lives inside a running process).
        TransportError: the broker is unreachable.
    """
    cli_options.refuse_memory_broker(config, "each handler's backlog", "/console/", "GET /scaling")
    async with contextlib.AsyncExitStack() as stack:
        transport = transports.create(config.broker_url)
        await transport.connect()
        stack.push_async_callback(transport.close)
        return await read(transport, handlers_of(found), config.concurrency)
