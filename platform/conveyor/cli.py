"""The ``conveyor`` command line.

Exit codes: 0 success, 1 runtime error (a broker or database failed), 2 usage
or configuration error (the message names the setting or flag to fix).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click
import orjson

from conveyor import (
    asyncapi,
    cli_options,
    db_cli,
    dlq_cli,
    errors,
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
@cli_options.database
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
@cli_options.database
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
@cli_options.database
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
@cli_options.database
@cli_options.http_options
@cli_options.exits
def scheduler(**flags: Any) -> None:
    """Fire the application's cron jobs, exactly once across any number of scheduler replicas."""
    _serve(cli_options.load(**flags), app.Parts(worker=False, scheduler=True))


main.add_command(dlq_cli.dlq)
main.add_command(outbox_cli.outbox)
main.add_command(sagas_cli.sagas)
main.add_command(schedules_cli.schedules)
main.add_command(db_cli.db)


@main.command()
@cli_options.common
@cli_options.database
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
            "the memory:// broker lives inside the `conveyor run` process; POST the event to that process "
            "(POST /events/TOPIC), or give --broker-url (CONVEYOR_BROKER_URL) a real broker"
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
    On the memory:// broker (the default) it cannot see the broker of a running
    `conveyor run`: that process's console shows the same figures.

    \b
    Columns:
      NAME        the handler's name
      TOPIC       the topic it consumes
      BACKLOG     messages waiting in its subscription (RabbitMQ: ready messages in
                  its queue; NATS: the durable's pending; Kafka: the group's lag);
                  "-" when it could not be read (the reason follows on stderr)
      OLDEST AGE  age of the oldest unsettled message, on brokers that know it
                  (NATS, Kafka); "-" otherwise
      CAPACITY    messages it runs at once in one worker process (its concurrency)

    Delayed retries are not counted. Every handler is listed (no row limit).
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per handler.")
@cli_options.exits
def list_handlers(as_json: bool, **flags: Any) -> None:
    """List the handlers the application declares: name, topic, attempts, timeout, concurrency.

    Reads the application's modules only (no broker, no database).

    \b
    Columns:
      NAME         the handler's name (its subscription on the broker)
      TOPIC        the topic it consumes
      ATTEMPTS     tries of one message, the first included, before it is dead-lettered
      TIMEOUT      seconds one attempt may take ("-": no limit)
      CONCURRENCY  messages it runs at once in one worker process
      FUNCTION     the function, as module.name

    Every handler is listed (no row limit).
    """
    config = cli_options.load(**flags)
    found = registry.discover(config.app, config.app_dir).handlers
    if as_json:
        listed = [
            {
                "name": h.name,
                "topic": h.topic,
                "attempts": h.retry.max_attempts,
                "timeout_seconds": h.timeout or None,
                "concurrency": h.concurrency or config.concurrency,
                "function": h.where,
            }
            for h in found
        ]
        click.echo(orjson.dumps(listed, option=orjson.OPT_INDENT_2).decode())
        return
    if not found:
        click.echo(f"no handlers in {', '.join(config.app)}")
        return
    rows = [("NAME", "TOPIC", "ATTEMPTS", "TIMEOUT", "CONCURRENCY", "FUNCTION")]
    for h in found:
        timeout = f"{h.timeout:g}s" if h.timeout else "-"
        rows.append(
            (h.name, h.topic, str(h.retry.max_attempts), timeout, str(h.concurrency or config.concurrency), h.where)
        )
    schedules_cli.print_table(rows)


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
