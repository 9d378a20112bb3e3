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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from event_store.database import Database
    from event_store.migrate import Revision, Upgraded

from conveyor import asyncapi, envelope, errors, persistence, ports, registry, stores, transports
from conveyor.console import auth as console_auth
from conveyor.runtime import heartbeat, housekeeping, http, orphans, relay, revision, scaling, scheduler, worker
from conveyor.sagas import runtime as saga_runtime
from conveyor.settings import Settings

log = logging.getLogger("conveyor")


@dataclass(frozen=True, slots=True)
class Parts:
    """Which components a process runs.

    Attributes:
        worker: consume and handle messages.
        ingest: accept ``POST /events/{topic}`` (into the outbox).
        relay: publish the outbox.
        scheduler: claim schedule fires and enqueue their jobs.
        embedded: the process is ``conveyor run``: the console is on unless
            ``CONVEYOR_CONSOLE=0``, and may act without a token on a loopback address.
    """

    worker: bool = True
    ingest: bool = False
    relay: bool = False
    scheduler: bool = False
    embedded: bool = False


def run_process(settings: Settings, main: Coroutine[Any, Any, Any]) -> Any:
    """Run a long-lived process's main coroutine on the configured event loop (``CONVEYOR_EVENT_LOOP``).

    Raises:
        ConfigurationError: ``uvloop`` was asked for and is not installed.
    """
    choice = settings.event_loop
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise errors.ConfigurationError(
                    "CONVEYOR_EVENT_LOOP=uvloop but uvloop is not installed: pip install 'conveyor[speed]'"
                ) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


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
    orphan_watch = asyncio.create_task(orphans.stop_when_orphaned(stop), name="orphan-watch")
    try:
        async with contextlib.AsyncExitStack() as stack:
            if settings.database_url == NO_DATABASE:
                _refuse_without_database(handlers, parts)
                await _serve_without_database(settings, handlers, parts, stop, stack)
                return
            concurrency = _handler_concurrency(handlers, settings) if parts.worker else 0
            stores = await open_persistence(settings, stack, concurrency)
            database = stores.database
            transport = await _connect(settings, stack)
            # Ingest and the scheduler only write to the database (the relay publishes): without a
            # worker or a relay, a broker outage degrades the process but leaves it ready.
            uses_broker = parts.worker or parts.relay
            checks = [
                http.Check("broker", transport.check, critical=uses_broker),
                http.Check("database", database.check),
            ]
            consumer = worker.Worker(
                [*handlers.handlers, *scheduler.job_handlers(handlers.schedules, stores)],
                transport,
                source=settings.service,
                concurrency=settings.concurrency,
                max_message_bytes=settings.max_message_bytes,
                transactions=stores.units,
                dead_letters=stores.dead_letters,
                plain_messages=settings.plain_messages,
                stall_after=settings.stall_after,
                hold_limit=settings.hold_limit,
                commit_timeout=settings.commit_timeout,
            )
            if parts.relay:
                # Queues must exist before the relay publishes, or a broker that drops
                # unrouted messages (RabbitMQ) loses what it sends first.
                await consumer.declare()
                store = stores.relay_store()
                stack.push_async_callback(store.close)
                retention = timedelta(seconds=settings.retention)
                options = relay.RelayOptions(
                    retention=retention, max_attempts=settings.relay_max_attempts, stall_after=settings.stall_after,
                    hold_limit=settings.hold_limit,
                )  # fmt: skip
                publisher = relay.Relay(store, transport, options=options)
                _background(stack, "relay", publisher.run)
                checks.append(http.Check("relay", publisher.progress))
                checks.append(http.Check("outbox", publisher.health, critical=False))
                saga_retention = timedelta(seconds=settings.saga_retention)
                _background(
                    stack,
                    "housekeeping",
                    lambda stop: housekeeping.run(stores, retention, stop, saga_retention=saga_retention),
                )
                if handlers.sagas:  # one process counts the instances, not every worker
                    _background(stack, "saga metrics", lambda stop: saga_runtime.report(stores, handlers.sagas, stop))
            if parts.scheduler:
                pacing = scheduler.SchedulerOptions(stall_after=settings.stall_after)
                cron = scheduler.Scheduler(handlers.schedules, stores, source=settings.service, options=pacing)
                _background(stack, "scheduler", cron.run)
                checks.append(http.Check("scheduler", cron.health))
            signal_source = await _start_worker(consumer, transport, checks, settings, stack) if parts.worker else None
            roles = [role for role in ("worker", "relay", "scheduler", "ingest") if getattr(parts, role)]
            snapshot = heartbeat.snapshot_of(settings.service, roles, consumer.load if parts.worker else None)
            _background(stack, "heartbeat", heartbeat.Beater(stores.heartbeats, snapshot).run)
            if settings.http_port:
                ingest = _ingest(settings, stores) if parts.ingest else None
                document = asyncapi.document(handlers, settings)
                board = _console(settings, parts, handlers, stores, transport, signal_source, stack)
                site = http.create_app(
                    checks, ingest, version_info(settings), scaling=signal_source, docs=document, console=board
                )
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
        orphan_watch.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")


NO_DATABASE = "none"
"""``CONVEYOR_DATABASE_URL=none``: a worker whose handlers need no database opens none (and loads no SQLAlchemy)."""


def _refuse_without_database(handlers: registry.Registry, parts: Parts) -> None:
    """Raise unless every part of the process works without a database.

    Raises:
        ConfigurationError: naming what needs one.
    """
    needs = [f"transactional handler {h.name}" for h in handlers.handlers if h.transactional]
    needs += [f"saga {saga.name}" for saga in handlers.sagas]
    needs += [f"cron job {schedule.name}" for schedule in handlers.schedules]
    needs += [part for part, on in (("the relay", parts.relay), ("the scheduler", parts.scheduler),
                                    ("HTTP ingest", parts.ingest)) if on]  # fmt: skip
    if needs:
        raise errors.ConfigurationError(
            f"CONVEYOR_DATABASE_URL={NO_DATABASE}, but {', '.join(needs)} need(s) a database: "
            "set CONVEYOR_DATABASE_URL to a database"
        )


async def _serve_without_database(
    settings: Settings, handlers: registry.Registry, parts: Parts, stop: asyncio.Event, stack: contextlib.AsyncExitStack
) -> None:
    """A worker with no database: handlers only (``ctx.transaction()`` raises; refused dead letters are redelivered)."""
    transport = await _connect(settings, stack)
    checks = [http.Check("broker", transport.check)]
    consumer = worker.Worker(
        handlers.handlers, transport, source=settings.service, concurrency=settings.concurrency,
        max_message_bytes=settings.max_message_bytes, plain_messages=settings.plain_messages,
        stall_after=settings.stall_after, hold_limit=settings.hold_limit,
    )  # fmt: skip
    signal_source = await _start_worker(consumer, transport, checks, settings, stack) if parts.worker else None
    if settings.http_port:
        document = asyncapi.document(handlers, settings)
        site = http.create_app(checks, None, version_info(settings), scaling=signal_source, docs=document)
        server = http.HttpServer(site, settings.http_host, settings.http_port, settings.drain_timeout)
        await server.start()
        stack.push_async_callback(server.stop)
    log.info("service %s ready (broker %s, no database)", settings.service, redact(settings.broker_url))
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", settings.drain_timeout)


async def _start_worker(
    consumer: worker.Worker,
    transport: ports.Transport,
    checks: list[http.Check],
    settings: Settings,
    stack: contextlib.AsyncExitStack,
) -> http.Scaling:
    """Start consuming (drained at shutdown), add the subscriptions check; return the scaling signal."""
    stack.push_async_callback(_drain, consumer, settings.drain_timeout)
    await consumer.start()
    checks.append(http.Check("subscriptions", consumer.check_subscriptions))
    checks.append(http.Check("progress", consumer.check_progress))
    reporter = scaling.ScalingReporter(transport, consumer)
    _background(stack, "scaling", reporter.run)
    return reporter.snapshot


async def open_database(settings: Settings, stack: contextlib.AsyncExitStack, concurrency: int = 0) -> Database:
    """Open the service's database, refusing one that is not migrated.

    Its pool holds at least ``concurrency`` (the process's handlers' total)
    connections plus those of the relay, the scheduler and readiness.

    Raises:
        ConfigurationError: unmigrated database (the message names ``conveyor db upgrade``).
        StoreError: the database is unreachable.
    """
    from event_store import migrate
    from event_store.database import Database

    await migrate.ensure_current(settings.database_url)
    database = Database(settings.database_url, concurrency=concurrency)
    stack.push_async_callback(database.close)
    return database


async def upgrade_database(url: str) -> Upgraded:
    """Create or migrate the database's tables to the current version (``conveyor db upgrade``).

    Returns:
        The revisions before and after, and the tables created.

    Raises:
        ConfigurationError: invalid database URL.
        StoreError: the database is unreachable or refused a migration.
    """
    from event_store import migrate

    return await migrate.upgrade(url)


async def database_history(url: str) -> list[Revision]:
    """Every migration, oldest first, marked as applied to the database or not (``conveyor db history``).

    Raises:
        ConfigurationError: invalid database URL, or a version table with several revisions.
        StoreError: the database is unreachable.
    """
    from event_store import migrate

    return await migrate.history(url)


async def open_persistence(
    settings: Settings, stack: contextlib.AsyncExitStack, concurrency: int = 0
) -> persistence.Persistence:
    """Open the service's database and its stores (the one place that builds the SQL ones).

    ``concurrency`` sizes the pool (see :func:`open_database`).

    Raises:
        ConfigurationError: unmigrated database (the message names ``conveyor db upgrade``).
        StoreError: the database is unreachable.
    """
    return stores_for(await open_database(settings, stack, concurrency), settings.service)


async def open_outbox_store(settings: Settings, stack: contextlib.AsyncExitStack) -> stores.OutboxStore:
    """Open the service's outbox for an operator (``conveyor outbox ...``); it is never claimed from here.

    Raises:
        ConfigurationError: unmigrated database (the message names ``conveyor db upgrade``).
        StoreError: the database is unreachable.
    """
    store = (await open_persistence(settings, stack)).relay_store()
    stack.push_async_callback(store.close)
    return store


def version_info(settings: Settings) -> dict[str, str | None]:
    """The body of ``GET /version``: package version, git commit, broker and database kinds.

    The commit is read once, here (at start-up): see :func:`conveyor.runtime.revision.commit`.
    """
    try:
        version: str | None = importlib.metadata.version("conveyor")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "version": version,
        "git_sha": revision.commit(settings.app_dir),
        "broker": settings.broker_url.split(":", 1)[0],
        "database": settings.database_url.split(":", 1)[0].split("+", 1)[0],
    }


def _handler_concurrency(handlers: registry.Registry, settings: Settings) -> int:
    """Messages the process's handlers may handle at once, each possibly holding a connection."""
    return sum(1 if h.batch else h.concurrency or settings.concurrency for h in handlers.handlers)


def stores_for(database: Database, source: str) -> persistence.Persistence:
    """The SQL stores of an open database behind the persistence ports.

    Args:
        database: the service's database.
        source: CloudEvents ``source`` of messages the stores build.
    """
    from event_store.unit_of_work import sql_persistence

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


def _console(
    settings: Settings,
    parts: Parts,
    handlers: registry.Registry,
    stores: persistence.Persistence,
    transport: ports.Transport,
    scaling_source: http.Scaling | None,
    stack: contextlib.AsyncExitStack,
) -> list[BaseRoute] | None:
    """The operations console's routes, or None where it is off (see :func:`conveyor.console.auth.access_for`)."""
    token = settings.console_token.get_secret_value() if settings.console_token else None
    access = console_auth.access_for(
        enabled=settings.console,
        token=token,
        readonly=settings.console_readonly,
        host=settings.http_host,
        embedded=parts.embedded,
    )
    if access is None:
        if parts.embedded and settings.console is None and token is None:
            log.warning("console off: %s is reachable from elsewhere; set CONVEYOR_CONSOLE_TOKEN", settings.http_host)
        return None
    from conveyor.console import app as console_app
    from conveyor.console import sources as console_sources

    outbox = stores.relay_store()  # the operator side only: never claimed from here
    stack.push_async_callback(outbox.close)
    sources = console_sources.Sources(
        service=settings.service,
        app=handlers,
        stores=stores,
        outbox=outbox,
        open_transport=lambda: transports.create(settings.broker_url),
        scaling=scaling_source,
        transport=transport,
    )
    board = console_app.Console(sources, access)
    _background(stack, "console", board.run)
    mode = "token" if token else "local, actions allowed" if access.local_actions else "local, view only"
    log.info("console on /console (%s%s)", mode, ", read-only" if access.readonly else "")
    return board.routes()


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
