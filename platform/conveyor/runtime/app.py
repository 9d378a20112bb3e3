"""Assembling a process: transport, worker, HTTP, signals and orderly shutdown.

Every process type (``run``, ``worker``, ``serve``) is the same assembly with
different parts switched on. Components push their own teardown on an
``AsyncExitStack``, so shutdown runs in reverse start-up order: HTTP stops
taking requests, the worker drains, then the broker connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from conveyor import asyncapi, envelope, errors, persistence, ports, registry, transports
from conveyor.runtime import housekeeping, http, relay, scaling, scheduler, worker
from conveyor.sagas import runtime as saga_runtime
from conveyor.settings import Settings
from event_store import migrate
from event_store.database import Database
from event_store.unit_of_work import sql_persistence

log = logging.getLogger("conveyor")


@dataclass(frozen=True, slots=True)
class Parts:
    """Which components a process runs.

    Attributes:
        worker: consume and handle messages.
        ingest: accept ``POST /events/{topic}`` (into the outbox).
        relay: publish the outbox.
        scheduler: claim schedule fires and enqueue their jobs.
    """

    worker: bool = True
    ingest: bool = False
    relay: bool = False
    scheduler: bool = False


async def serve(
    settings: Settings, handlers: registry.Registry, parts: Parts, stop: asyncio.Event | None = None
) -> None:
    """Run a process until SIGTERM/SIGINT (or ``stop``), then shut down in order.

    Raises:
        ConfigurationError: a component cannot start with this configuration
            (including an unmigrated database).
        TransportError: the broker cannot be reached at start-up.
        StoreError: the database cannot be reached at start-up.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            stores = await open_persistence(settings, stack)
            database = stores.database
            transport = await _connect(settings, stack)
            checks = [http.Check("broker", transport.check), http.Check("database", database.check)]
            consumer = worker.Worker(
                [*handlers.handlers, *scheduler.job_handlers(handlers.schedules, stores)],
                transport,
                source=settings.service,
                concurrency=settings.concurrency,
                max_message_bytes=settings.max_message_bytes,
                transactions=stores.units,
                dead_letters=stores.dead_letters,
                plain_messages=settings.plain_messages,
            )
            if parts.relay:
                # Queues must exist before the relay publishes, or a broker that drops
                # unrouted messages (RabbitMQ) loses what it sends first.
                await consumer.declare()
                store = stores.relay_store()
                stack.push_async_callback(store.close)
                retention = timedelta(seconds=settings.retention)
                options = relay.RelayOptions(retention=retention, max_attempts=settings.relay_max_attempts)
                publisher = relay.Relay(store, transport, options=options)
                _background(stack, "relay", publisher.run)
                checks.append(http.Check("relay", publisher.health, critical=False))
                _background(stack, "housekeeping", lambda stop: housekeeping.run(stores, retention, stop))
            if parts.scheduler:
                cron = scheduler.Scheduler(handlers.schedules, stores, source=settings.service)
                _background(stack, "scheduler", cron.run)
            if parts.worker and handlers.sagas:
                _background(stack, "saga metrics", lambda stop: saga_runtime.report(stores, handlers.sagas, stop))
            signal_source: http.Scaling | None = None
            if parts.worker:
                stack.push_async_callback(_drain, consumer, settings.drain_timeout)
                await consumer.start()
                checks.append(http.Check("subscriptions", _subscriptions_probe(consumer)))
                reporter = scaling.ScalingReporter(transport, consumer)
                _background(stack, "scaling", reporter.run)
                signal_source = reporter.snapshot
            if settings.http_port:
                ingest = _ingest(settings, stores) if parts.ingest else None
                document = asyncapi.document(handlers, settings)
                site = http.create_app(checks, ingest, version_info(settings), scaling=signal_source, docs=document)
                server = http.HttpServer(site, settings.http_host, settings.http_port, settings.drain_timeout)
                await server.start()
                stack.push_async_callback(server.stop)
            log.info(
                "service %s ready (broker %s, database %s)",
                settings.service,
                redact(settings.broker_url),
                database.display_url(),
            )
            await stop.wait()
            log.info("shutting down: draining for up to %.0fs", settings.drain_timeout)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")


async def open_database(settings: Settings, stack: contextlib.AsyncExitStack) -> Database:
    """Open the service's database, refusing one that is not migrated.

    Raises:
        ConfigurationError: unmigrated database (the message names ``conveyor db upgrade``).
        StoreError: the database is unreachable.
    """
    await migrate.ensure_current(settings.database_url)
    database = Database(settings.database_url)
    stack.push_async_callback(database.close)
    return database


async def upgrade_database(url: str) -> None:
    """Create or migrate the database's tables to the current version (``conveyor db upgrade``).

    Raises:
        ConfigurationError: invalid database URL.
        StoreError: the database is unreachable or refused a migration.
    """
    await migrate.upgrade(url)


async def open_persistence(settings: Settings, stack: contextlib.AsyncExitStack) -> persistence.Persistence:
    """Open the service's database and its stores (the one place that builds the SQL ones).

    Raises:
        ConfigurationError: unmigrated database (the message names ``conveyor db upgrade``).
        StoreError: the database is unreachable.
    """
    return stores_for(await open_database(settings, stack), settings.service)


async def open_outbox_store(settings: Settings, stack: contextlib.AsyncExitStack) -> ports.OutboxStore:
    """Open the service's outbox for an operator (``conveyor outbox ...``); it is never claimed from here.

    Raises:
        ConfigurationError: unmigrated database (the message names ``conveyor db upgrade``).
        StoreError: the database is unreachable.
    """
    store = (await open_persistence(settings, stack)).relay_store()
    stack.push_async_callback(store.close)
    return store


def version_info(settings: Settings) -> dict[str, str | None]:
    """The body of ``GET /version``: package version, git commit (``CONVEYOR_GIT_SHA``), broker and database kinds."""
    try:
        version: str | None = importlib.metadata.version("conveyor")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "version": version,
        "git_sha": os.environ.get("CONVEYOR_GIT_SHA") or None,
        "broker": settings.broker_url.split(":", 1)[0],
        "database": settings.database_url.split(":", 1)[0].split("+", 1)[0],
    }


def stores_for(database: Database, source: str) -> persistence.Persistence:
    """The SQL stores of an open database behind the persistence ports.

    Args:
        database: the service's database.
        source: CloudEvents ``source`` of messages the stores build.
    """
    return sql_persistence(database, source)


def _background(
    stack: contextlib.AsyncExitStack, name: str, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    """Run ``run(stop)`` as a task until shutdown; a crash is logged and ends the process."""
    stopping = asyncio.Event()
    task = asyncio.create_task(run(stopping), name=name)

    def crashed(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.critical("%s stopped unexpectedly: %r; shutting down", name, done.exception())
            os.kill(os.getpid(), signal.SIGTERM)

    task.add_done_callback(crashed)

    async def stop() -> None:
        stopping.set()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(stop)


async def declare(settings: Settings, handlers: registry.Registry) -> None:
    """Create or reconcile the broker topology of every handler and schedule job, then disconnect.

    Raises:
        TransportError: the broker refused the topology or is unreachable.
    """
    async with contextlib.AsyncExitStack() as stack:
        transport = await _connect(settings, stack)
        jobs = scheduler.job_handlers(handlers.schedules, None)  # topology only: never run here
        await worker.Worker([*handlers.handlers, *jobs], transport, source=settings.service).declare()


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


def _ingest(settings: Settings, stores: persistence.Persistence) -> http.IngestConfig:
    async def accept(topic: str, event: envelope.Envelope) -> http.Outcome:
        # Idempotent by event id: a client that retries a post gets the first answer again.
        async with stores.database.transaction() as tx:
            return await stores.outbox.add_once(tx, topic, event)

    token = settings.ingest_token.get_secret_value() if settings.ingest_token else None
    return http.IngestConfig(
        accept=accept, max_bytes=settings.max_message_bytes, token=token, tenants=settings.ingest_tokens
    )


def redact(url: str) -> str:
    """The URL with its credentials hidden, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
