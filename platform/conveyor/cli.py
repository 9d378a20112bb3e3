"""The ``conveyor`` command line.

Exit codes: 0 success, 1 runtime error (a broker or database failed), 2 usage
or configuration error (the message names the setting or flag to fix).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson

from conveyor import errors, logs, outbox_cli, registry, schedules_cli, settings
from conveyor.runtime import app, supervisor

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("conveyor.cli")


def _common(func: F) -> F:
    """Options every command takes; each overrides its ``CONVEYOR_*`` setting."""
    options = [
        click.option("--broker-url", help="Broker URL (CONVEYOR_BROKER_URL), e.g. nats://127.0.0.1:4222."),
        click.option("--app", "app_modules", help="Comma-separated modules to load (CONVEYOR_APP)."),
        click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR (CONVEYOR_LOG_LEVEL)."),
        click.option(
            "--log-format", type=click.Choice(["text", "json"]), help="Log line format (CONVEYOR_LOG_FORMAT)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _http_options(func: F) -> F:
    func = click.option("--port", type=int, help="HTTP port (CONVEYOR_HTTP_PORT); 0 turns HTTP off.")(func)
    return click.option("--host", help="HTTP address (CONVEYOR_HTTP_HOST).")(func)


def _load(**flags: Any) -> settings.Settings:
    config = settings.load(
        broker_url=flags.get("broker_url"),
        database_url=flags.get("database_url"),
        app=flags.get("app_modules"),
        log_level=flags.get("log_level"),
        log_format=flags.get("log_format"),
        http_host=flags.get("host"),
        http_port=flags.get("port"),
        concurrency=flags.get("concurrency"),
    )
    logs.configure(config.log_level, config.log_format)
    return config


def _exits(func: F) -> F:
    """Turn Conveyor errors into messages and exit codes 2 (configuration) or 1 (runtime)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.ConfigurationError as exc:
            click.echo(f"conveyor: configuration error: {exc}", err=True)
            sys.exit(2)
        except errors.NotFound as exc:
            click.echo(f"conveyor: {exc}", err=True)
            sys.exit(2)
        except errors.ConveyorError as exc:
            click.echo(f"conveyor: error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _serve(config: settings.Settings, parts: app.Parts) -> None:
    needs_app = parts.worker or parts.scheduler or parts.relay
    handlers = registry.discover(config.app, config.app_dir) if needs_app else registry.Registry()
    asyncio.run(app.serve(config, handlers, parts))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="conveyor")
def main() -> None:
    """Conveyor: event handlers and cron jobs on Kafka, RabbitMQ or NATS JetStream."""


@main.command()
@_common
@_http_options
@_exits
def run(**flags: Any) -> None:
    """Run everything in one process: worker and HTTP (health, metrics, event ingest).

    The local default: with no configuration it uses the in-memory broker and
    listens on 127.0.0.1:8000.
    """
    _serve(_load(**flags), app.Parts(worker=True, ingest=True, relay=True, scheduler=True))


@main.command()
@_common
@_http_options
@click.option("--concurrency", type=int, help="Messages per handler at once (CONVEYOR_CONCURRENCY).")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to run and keep running; child i serves HTTP on port + i.",
)
@click.option("--declare-only", is_flag=True, help="Create or reconcile the broker topology, then exit.")
@_exits
def worker(processes: int, declare_only: bool, **flags: Any) -> None:
    """Consume and handle messages (serves /healthz, /readyz, /metrics)."""
    config = _load(**flags)
    handlers = registry.discover(config.app, config.app_dir)
    if declare_only:
        asyncio.run(app.declare(config, handlers))
        count = len(handlers.handlers) + len(handlers.schedules)
        click.echo(f"declared {count} subscription(s) on {app.redact(config.broker_url)}")
    elif processes > 1:
        sys.exit(asyncio.run(supervisor.Supervisor(config, processes).run()))
    else:
        asyncio.run(app.serve(config, handlers, app.Parts(worker=True, ingest=False)))


@main.command()
@_common
@_http_options
@_exits
def relay(**flags: Any) -> None:
    """Publish the outbox: committed messages go to the broker, in per-key order.

    Declares the application's subscriptions first, so nothing it publishes is
    dropped by a broker that keeps only routed messages (RabbitMQ).
    """
    _serve(_load(**flags), app.Parts(worker=False, relay=True))


@main.command()
@_common
@_http_options
@_exits
def scheduler(**flags: Any) -> None:
    """Fire the application's cron jobs, exactly once across any number of scheduler replicas."""
    _serve(_load(**flags), app.Parts(worker=False, scheduler=True))


@main.group(invoke_without_command=True)
@_common
@click.pass_context
@_exits
def schedules(click_context: click.Context, /, **flags: Any) -> None:
    """List schedules: expression, time zone, next three fires, last run and its status."""
    click_context.obj = flags
    if click_context.invoked_subcommand is not None:
        return
    config = _load(**flags)
    found = registry.discover(config.app, config.app_dir)
    if not found.schedules:
        click.echo(f"no schedules in {', '.join(config.app)}")
        return
    rows = asyncio.run(schedules_cli.overview(config, found))
    schedules_cli.print_table([("NAME", "EXPRESSION", "TZ", "NEXT FIRES (UTC)", "LAST RUN", "STATE"), *rows])


def _schedule_command(verb: str, help_text: str) -> Callable[[Callable[..., Any]], Any]:
    def decorate(func: Callable[..., Any]) -> Any:
        return schedules.command(name=verb, help=help_text)(click.argument("name")(click.pass_context(_exits(func))))

    return decorate


@_schedule_command("trigger", "Run schedule NAME once now (its job goes through the outbox to a worker).")
def schedules_trigger(click_context: click.Context, name: str) -> None:
    config = _load(**click_context.obj)
    schedule = registry.discover(config.app, config.app_dir).schedule(name)
    run_id = asyncio.run(schedules_cli.trigger(config, schedule))
    click.echo(f"triggered {name} (run {run_id})")


@_schedule_command("pause", "Pause schedule NAME on every scheduler replica.")
def schedules_pause(click_context: click.Context, name: str) -> None:
    config = _load(**click_context.obj)
    asyncio.run(schedules_cli.set_paused(config, registry.discover(config.app, config.app_dir).schedule(name), True))
    click.echo(f"paused {name}")


@_schedule_command("resume", "Resume schedule NAME; fires missed while paused are not run.")
def schedules_resume(click_context: click.Context, name: str) -> None:
    config = _load(**click_context.obj)
    asyncio.run(schedules_cli.set_paused(config, registry.discover(config.app, config.app_dir).schedule(name), False))
    click.echo(f"resumed {name}")


@main.group()
def dlq() -> None:
    """Dead letters of a topic: list, show, replay to the topic, purge."""


def _dlq_command(func: F) -> F:
    func = click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)(func)
    func = click.argument("topic")(func)
    return _common(_exits(func))


async def _with_transport(config: settings.Settings, operation: Callable[[Any, Any], Any]) -> Any:
    """Run ``operation(transport, held)``: ``held`` is the database's store of refused dead letters, if migrated."""
    import contextlib

    from conveyor import transports

    if config.broker_url.startswith("memory:"):
        raise errors.ConfigurationError("dead letters on memory:// live inside the running process; use a real broker")
    async with contextlib.AsyncExitStack() as stack:
        held = None
        with contextlib.suppress(errors.ConfigurationError):  # no migrated database: only the broker's
            held = (await app.open_persistence(config, stack)).dead_letters
        transport = transports.create(config.broker_url)
        await transport.connect()
        stack.push_async_callback(transport.close)
        return await operation(transport, held)


@dlq.command(name="list")
@_dlq_command
def dlq_list(topic: str, limit: int, **flags: Any) -> None:
    """List dead letters of TOPIC (they stay in place)."""
    from conveyor.runtime import dead_letters

    config = _load(**flags)
    found = asyncio.run(_with_transport(config, lambda t, h: dead_letters.peek(t, topic, limit=limit, held=h)))
    if not found:
        click.echo(f"no dead letters for {topic}")
        return
    rows: list[tuple[str, ...]] = [("EVENT ID", "HANDLER", "ERROR TYPE", "ATTEMPTS", "AT", "ERROR")]
    rows += [(d.event_id or "-", d.handler, d.error_type, d.attempts, d.at, d.error[:60]) for d in found]
    schedules_cli.print_table(rows)


@dlq.command(name="show")
@_dlq_command
@click.argument("event_id")
def dlq_show(topic: str, event_id: str, limit: int, **flags: Any) -> None:
    """Show one dead letter of TOPIC: the reason, the headers and the body."""
    from conveyor.runtime import dead_letters

    config = _load(**flags)
    found = asyncio.run(_with_transport(config, lambda t, h: dead_letters.peek(t, topic, limit=limit, held=h)))
    match = next((d for d in found if d.event_id == event_id), None)
    if match is None:
        raise errors.NotFound(f"no dead letter with event id {event_id!r} among the first {limit} of {topic}")
    click.echo(f"topic: {match.topic}\nhandler: {match.handler}\nerror: {match.error_type}: {match.error}")
    click.echo(f"attempts: {match.attempts}\ndead-lettered at: {match.at}\nheaders:")
    for name, value in sorted(match.message.headers.items()):
        click.echo(f"  {name}: {value}")
    click.echo("body:\n" + match.message.body.decode("utf-8", errors="replace"))


@dlq.command(name="replay")
@_dlq_command
def dlq_replay(topic: str, limit: int, **flags: Any) -> None:
    """Send up to --limit dead letters of TOPIC back to the topic they failed on."""
    from conveyor.runtime import dead_letters

    config = _load(**flags)
    found = asyncio.run(_with_transport(config, lambda t, h: dead_letters.replay(t, topic, limit=limit, held=h)))
    click.echo(f"replayed {len(found)} dead letter(s) of {topic}")


@dlq.command(name="purge")
@_dlq_command
@click.option("--yes", is_flag=True, help="Confirm: the dead letters are deleted.")
def dlq_purge(topic: str, limit: int, yes: bool, **flags: Any) -> None:
    """Delete up to --limit dead letters of TOPIC."""
    from conveyor.runtime import dead_letters

    if not yes:
        raise click.UsageError("purging deletes dead letters: add --yes")
    config = _load(**flags)
    found = asyncio.run(_with_transport(config, lambda t, h: dead_letters.purge(t, topic, limit=limit, held=h)))
    click.echo(f"purged {len(found)} dead letter(s) of {topic}")


@main.group()
def outbox() -> None:
    """Unsent outbox messages: list, show; retry or purge the parked ones."""


def _outbox_command(func: F) -> F:
    func = click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")(func)
    return _common(_exits(func))


@outbox.command(name="list")
@click.option("--parked", is_flag=True, help="Only parked messages (they wait for retry or purge).")
@click.option("--topic", help="Only messages to this topic.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_outbox_command
def outbox_list(parked: bool, topic: str | None, limit: int, **flags: Any) -> None:
    """List unsent outbox messages, oldest first: status, attempts, last error."""
    found = asyncio.run(
        outbox_cli.run(
            _load(**flags),
            lambda store: store.entries(status="parked" if parked else None, topic=topic, limit=limit),
        )
    )
    if not found:
        click.echo("no parked outbox messages" if parked else "no unsent outbox messages")
        return
    schedules_cli.print_table(outbox_cli.table(found))


@outbox.command(name="show")
@click.argument("message_id")
@_outbox_command
def outbox_show(message_id: str, **flags: Any) -> None:
    """Show one outbox message: status, attempts, last error, headers and body."""
    entry = asyncio.run(outbox_cli.run(_load(**flags), lambda store: store.get(message_id)))
    click.echo(outbox_cli.describe(entry))


@outbox.command(name="retry")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every parked message.")
@_outbox_command
def outbox_retry(message_ids: tuple[str, ...], every: bool, **flags: Any) -> None:
    """Publish MESSAGE_ID(s) again now, attempts reset (--all: every parked message), ahead of their key."""
    chosen = outbox_cli.chosen(message_ids, every)
    count = asyncio.run(outbox_cli.run(_load(**flags), lambda store: store.retry(chosen)))
    click.echo(f"{count} outbox message(s) will be published again")


@outbox.command(name="purge")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every parked message.")
@click.option("--yes", is_flag=True, help="Confirm: the messages are deleted, never published.")
@_outbox_command
def outbox_purge(message_ids: tuple[str, ...], every: bool, yes: bool, **flags: Any) -> None:
    """Delete parked MESSAGE_ID(s) (--all: every parked one); the later messages of their keys move on."""
    chosen = outbox_cli.chosen(message_ids, every)
    if not yes:
        raise click.UsageError("purging deletes parked messages for good: add --yes")
    count = asyncio.run(outbox_cli.run(_load(**flags), lambda store: store.purge_parked(chosen)))
    click.echo(f"purged {count} parked outbox message(s)")


@main.group()
def db() -> None:
    """The service's database."""


@db.command()
@click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")
@_exits
def upgrade(database_url: str | None) -> None:
    """Create or migrate the database's tables (events, outbox, inbox, schedules, sagas)."""
    config = settings.load(database_url=database_url)
    logs.configure(config.log_level, config.log_format)
    asyncio.run(app.upgrade_database(config.database_url))
    click.echo(f"database {app.redact(config.database_url)} is up to date")


@main.command()
@_common
@_http_options
@_exits
def serve(**flags: Any) -> None:
    """HTTP only: health, metrics and POST /events/{topic}."""
    _serve(_load(**flags), app.Parts(worker=False, ingest=True))


@main.command()
@_common
@click.argument("topic")
@click.argument("data")
@click.option("--key", help="Ordering key (partitionkey).")
@click.option("--type", "event_type", help="CloudEvents type (default: the topic).")
@_exits
def publish(topic: str, data: str, key: str | None, event_type: str | None, **flags: Any) -> None:
    """Publish DATA (JSON text) to TOPIC and wait for the broker's confirmation."""
    from conveyor.publisher import Publisher

    config = _load(**flags)
    if config.broker_url.startswith("memory:"):
        raise errors.ConfigurationError(
            "the memory:// broker exists only inside one process; POST the event to a running "
            "`conveyor run` (POST /events/TOPIC) or set CONVEYOR_BROKER_URL to a real broker"
        )
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="DATA") from exc

    async def send() -> str:
        async with Publisher(config.broker_url, source=config.service) as publisher:
            event = await publisher.publish(topic, value, key=key, type=event_type)
            return event.id

    click.echo(asyncio.run(send()))


@main.command(name="handlers")
@_common
@_exits
def list_handlers(**flags: Any) -> None:
    """List the handlers the application declares: name, topic, attempts, timeout, concurrency."""
    config = _load(**flags)
    found = registry.discover(config.app, config.app_dir).handlers
    if not found:
        click.echo(f"no handlers in {', '.join(config.app)}")
        return
    rows = [("NAME", "TOPIC", "ATTEMPTS", "TIMEOUT", "CONCURRENCY", "FUNCTION")]
    for h in found:
        timeout = f"{h.timeout:g}s" if h.timeout else "-"
        rows.append(
            (h.name, h.topic, str(h.retry.max_attempts), timeout, str(h.concurrency or config.concurrency), h.where)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":  # pragma: no cover
    main()
