"""The ``conveyor`` command line.

Exit codes: 0 success, 1 runtime error (a broker or database failed), 2 usage
or configuration error (the message names the setting or flag to fix).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from conveyor import (
    asyncapi,
    cli_options,
    dlq_cli,
    errors,
    logs,
    outbox_cli,
    registry,
    sagas_cli,
    schedules_cli,
    settings,
    status_cli,
)
from conveyor.runtime import app, supervisor

log = logging.getLogger("conveyor.cli")


def _serve(config: settings.Settings, parts: app.Parts) -> None:
    needs_app = parts.worker or parts.scheduler or parts.relay or parts.ingest  # ingest serves the app's docs
    handlers = registry.discover(config.app, config.app_dir) if needs_app else registry.Registry()
    app.run_process(config, app.serve(config, handlers, parts))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="conveyor")
def main() -> None:
    """Conveyor: event handlers and cron jobs on Kafka, RabbitMQ or NATS JetStream."""


@main.command()
@cli_options.common
@cli_options.http_options
@cli_options.exits
def run(**flags: Any) -> None:
    """Run everything in one process: worker, relay, scheduler and HTTP (health, metrics, event ingest).

    The local default: with no configuration it uses the in-memory broker and
    ``conveyor.db`` (SQLite), and listens on 127.0.0.1:8000. On SQLite it
    migrates the database itself; the production process types (worker,
    relay, scheduler, serve) refuse an unmigrated database instead.
    """
    config = cli_options.load(**flags)
    if config.database_url.startswith("sqlite"):
        asyncio.run(app.upgrade_database(config.database_url))
    _serve(config, app.Parts(worker=True, ingest=True, relay=True, scheduler=True, embedded=True))


@main.command()
@cli_options.common
@cli_options.http_options
@click.option("--concurrency", type=int, help="Messages per handler at once (CONVEYOR_CONCURRENCY).")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to run and keep running; child i serves HTTP on port + i.",
)
@click.option("--declare-only", is_flag=True, help="Create or reconcile the broker topology, then exit.")
@cli_options.exits
def worker(processes: int, declare_only: bool, **flags: Any) -> None:
    """Consume and handle messages (serves /healthz, /readyz, /metrics)."""
    config = cli_options.load(**flags)
    handlers = registry.discover(config.app, config.app_dir)
    if declare_only:
        asyncio.run(app.declare(config, handlers))
        count = len(handlers.handlers) + len(handlers.schedules)
        click.echo(f"declared {count} subscription(s) on {app.redact(config.broker_url)}")
    elif processes > 1:
        sys.exit(asyncio.run(supervisor.Supervisor(config, processes).run()))
    else:
        app.run_process(config, app.serve(config, handlers, app.Parts(worker=True, ingest=False)))


@main.command()
@cli_options.common
@cli_options.http_options
@cli_options.exits
def relay(**flags: Any) -> None:
    """Publish the outbox: committed messages go to the broker, in per-key order.

    Declares the application's subscriptions first, so nothing it publishes is
    dropped by a broker that keeps only routed messages (RabbitMQ).
    """
    _serve(cli_options.load(**flags), app.Parts(worker=False, relay=True))


@main.command()
@cli_options.common
@cli_options.http_options
@cli_options.exits
def scheduler(**flags: Any) -> None:
    """Fire the application's cron jobs, exactly once across any number of scheduler replicas."""
    _serve(cli_options.load(**flags), app.Parts(worker=False, scheduler=True))


@main.group(invoke_without_command=True)
@cli_options.common
@click.pass_context
@cli_options.exits
def schedules(click_context: click.Context, /, **flags: Any) -> None:
    """List schedules: expression, time zone, next three fires, last run and its status."""
    click_context.obj = flags
    if click_context.invoked_subcommand is not None:
        return
    config = cli_options.load(**flags)
    found = registry.discover(config.app, config.app_dir)
    if not found.schedules:
        click.echo(f"no schedules in {', '.join(config.app)}")
        return
    rows = asyncio.run(schedules_cli.overview(config, found))
    schedules_cli.print_table([("NAME", "EXPRESSION", "TZ", "NEXT FIRES (UTC)", "LAST RUN", "STATE"), *rows])


def _schedule_command(verb: str, help_text: str) -> Callable[[Callable[..., Any]], Any]:
    def decorate(func: Callable[..., Any]) -> Any:
        return schedules.command(name=verb, help=help_text)(
            click.argument("name")(click.pass_context(cli_options.exits(func)))
        )

    return decorate


@_schedule_command("trigger", "Run schedule NAME once now (its job goes through the outbox to a worker).")
def schedules_trigger(click_context: click.Context, name: str) -> None:
    config = cli_options.load(**click_context.obj)
    schedule = registry.discover(config.app, config.app_dir).schedule(name)
    run_id = asyncio.run(schedules_cli.trigger(config, schedule))
    click.echo(f"triggered {name} (run {run_id})")


@_schedule_command("pause", "Pause schedule NAME on every scheduler replica.")
def schedules_pause(click_context: click.Context, name: str) -> None:
    config = cli_options.load(**click_context.obj)
    asyncio.run(schedules_cli.set_paused(config, registry.discover(config.app, config.app_dir).schedule(name), True))
    click.echo(f"paused {name}")


@_schedule_command("resume", "Resume schedule NAME; fires missed while paused are not run.")
def schedules_resume(click_context: click.Context, name: str) -> None:
    config = cli_options.load(**click_context.obj)
    asyncio.run(schedules_cli.set_paused(config, registry.discover(config.app, config.app_dir).schedule(name), False))
    click.echo(f"resumed {name}")


main.add_command(dlq_cli.dlq)
main.add_command(outbox_cli.outbox)
main.add_command(sagas_cli.sagas)


@main.group()
def db() -> None:
    """The service's database."""


@db.command()
@click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")
@cli_options.exits
def upgrade(database_url: str | None) -> None:
    """Create or migrate the database's tables (events, outbox, inbox, schedules, sagas)."""
    config = settings.load(database_url=database_url)
    logs.configure(config.log_level, config.log_format)
    asyncio.run(app.upgrade_database(config.database_url))
    click.echo(f"database {app.redact(config.database_url)} is up to date")


@main.command()
@cli_options.common
@cli_options.http_options
@cli_options.exits
def serve(**flags: Any) -> None:
    """HTTP only: health, metrics and POST /events/{topic}."""
    _serve(cli_options.load(**flags), app.Parts(worker=False, ingest=True))


@main.command()
@cli_options.common
@click.argument("topic")
@click.argument("data")
@click.option("--key", help="Ordering key (partitionkey).")
@click.option("--type", "event_type", help="CloudEvents type (default: the topic).")
@cli_options.exits
def publish(topic: str, data: str, key: str | None, event_type: str | None, **flags: Any) -> None:
    """Publish DATA (JSON text) to TOPIC and wait for the broker's confirmation."""
    from conveyor.publisher import Publisher

    config = cli_options.load(**flags)
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


@main.command()
@cli_options.common
@click.option("--concurrency", type=int, help="Default per-handler concurrency (CONVEYOR_CONCURRENCY).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@cli_options.exits
def status(as_json: bool, **flags: Any) -> None:
    """Show each handler's backlog on the broker: name, topic, backlog, oldest age, capacity.

    Starts no worker and opens no database. Exits 1 if a backlog could not be read.
    """
    config = cli_options.load(**flags)
    found = registry.discover(config.app, config.app_dir)
    rows = asyncio.run(status_cli.status(config, found))
    if as_json:
        click.echo(orjson.dumps([row.as_json() for row in rows], option=orjson.OPT_INDENT_2).decode())
        sys.exit(1 if any(row.error is not None for row in rows) else 0)
    if not rows:
        click.echo(f"no handlers in {', '.join(config.app)}")
        return
    schedules_cli.print_table([status_cli.HEADER, *(row.cells() for row in rows)])
    failed = [row for row in rows if row.error is not None]
    for row in failed:
        click.echo(f"conveyor: {row.handler}: {row.error}", err=True)
    if failed:
        sys.exit(1)


@main.command(name="handlers")
@cli_options.common
@cli_options.exits
def list_handlers(**flags: Any) -> None:
    """List the handlers the application declares: name, topic, attempts, timeout, concurrency."""
    config = cli_options.load(**flags)
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


@main.command()
@cli_options.common
@click.option("--format", "output", type=click.Choice(["json", "yaml"]), default="json", show_default=True)
@cli_options.exits
def docs(output: str, **flags: Any) -> None:
    """Print the AsyncAPI 3.0.0 document of the application: channels, operations, payload schemas (no broker or DB)."""
    config = cli_options.load(**flags)
    click.echo(asyncapi.render(asyncapi.document(registry.discover(config.app, config.app_dir), config), output))


if __name__ == "__main__":  # pragma: no cover
    main()
