"""Assembling a process: transport, worker, HTTP, signals and orderly shutdown.

Every process type (``run``, ``worker``, ``serve``) is the same assembly with
different parts switched on. Components push their own teardown on an
``AsyncExitStack``, so shutdown runs in reverse start-up order: HTTP stops
taking requests, the worker drains, then the broker connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from conveyor import envelope, errors, ports, registry, transports
from conveyor.runtime import http, worker
from conveyor.settings import Settings

log = logging.getLogger("conveyor")


@dataclass(frozen=True, slots=True)
class Parts:
    """Which components a process runs.

    Attributes:
        worker: consume and handle messages.
        ingest: accept ``POST /events/{topic}``.
    """

    worker: bool = True
    ingest: bool = False


async def serve(settings: Settings, handlers: registry.Registry, parts: Parts, stop: asyncio.Event | None = None) -> None:
    """Run a process until SIGTERM/SIGINT (or ``stop``), then shut down in order.

    Raises:
        ConfigurationError: a component cannot start with this configuration.
        TransportError: the broker cannot be reached at start-up.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            transport = await _connect(settings, stack)
            checks = [http.Check("broker", transport.check)]
            if parts.worker:
                consumer = worker.Worker(
                    handlers.handlers,
                    transport,
                    source=settings.service,
                    concurrency=settings.concurrency,
                    max_message_bytes=settings.max_message_bytes,
                )
                stack.push_async_callback(_drain, consumer, settings.drain_timeout)
                await consumer.start()
                checks.append(http.Check("subscriptions", _subscriptions_probe(consumer)))
            if settings.http_port:
                ingest = _ingest(settings, transport) if parts.ingest else None
                server = http.HttpServer(http.create_app(checks, ingest), settings.http_host, settings.http_port)
                await server.start()
                stack.push_async_callback(server.stop)
            log.info("service %s ready (broker %s)", settings.service, redact(settings.broker_url))
            await stop.wait()
            log.info("shutting down: draining for up to %.0fs", settings.drain_timeout)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")


async def declare(settings: Settings, handlers: registry.Registry) -> None:
    """Create or reconcile the broker topology of every handler, then disconnect.

    Raises:
        TransportError: the broker refused the topology or is unreachable.
    """
    async with contextlib.AsyncExitStack() as stack:
        transport = await _connect(settings, stack)
        await worker.Worker(handlers.handlers, transport, source=settings.service).declare()


async def _connect(settings: Settings, stack: contextlib.AsyncExitStack) -> ports.Transport:
    transport = transports.create(settings.broker_url)
    await transport.connect()
    stack.push_async_callback(transport.close)
    return transport


async def _drain(consumer: worker.Worker, timeout: float) -> None:
    await consumer.stop(timeout)


def _subscriptions_probe(consumer: worker.Worker) -> Callable[[], Awaitable[None]]:
    async def probe() -> None:
        if not consumer.ready:
            raise errors.TransportError("not every subscription is consuming")

    return probe


def _ingest(settings: Settings, transport: ports.Transport) -> http.IngestConfig:
    async def accept(topic: str, event: envelope.Envelope) -> None:
        await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))

    token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
    return http.IngestConfig(accept=accept, max_bytes=settings.max_message_bytes, token=token)


def redact(url: str) -> str:
    """The URL with its credentials hidden, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
