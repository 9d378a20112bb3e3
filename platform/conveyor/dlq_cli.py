"""``conveyor dlq``: list, show, replay and purge the dead letters of a topic.

Dead letters are read through the Transport port from each topic's keeper
subscription, plus those held in the database because the broker refused them
(:mod:`conveyor.runtime.dead_letters`). TOPIC is the topic or its dead-letter
topic (``orders.placed`` or ``orders.placed.dlq``); ``--handler`` and
``--error-type`` choose the letters a command lists or acts on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import orjson

from conveyor import cli_options, errors, schedules_cli, settings
from conveyor.runtime import app

if TYPE_CHECKING:
    from conveyor.runtime.dead_letters import Select


@click.group()
def dlq() -> None:
    """Dead letters of a topic: list, show, replay to the topic, purge."""


def _dlq_command(func: cli_options.F) -> cli_options.F:
    func = click.option("--error-type", help="Only dead letters with this error type (e.g. Rejected).")(func)
    func = click.option("--handler", help="Only dead letters of this handler.")(func)
    func = click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=100,
        show_default=True,
        help="Most dead letters to read: list shows them, show searches them, replay and purge act on them.",
    )(func)
    func = click.argument("topic")(func)
    return cli_options.common(cli_options.exits(func))


def _chosen(flags: dict[str, Any]) -> Select | None:
    """The ``select`` of the ``--handler`` and ``--error-type`` flags (taken out of ``flags``); None: every letter."""
    from conveyor.runtime import dead_letters

    handler, error_type = flags.pop("handler", None), flags.pop("error_type", None)
    if handler is None and error_type is None:
        return None
    return dead_letters.matching(handler=handler, error_type=error_type)


async def _with_transport(config: settings.Settings, operation: Callable[[Any, Any], Any]) -> Any:
    """Run ``operation(transport, held)``: ``held`` is the database's store of refused dead letters, if migrated."""
    from conveyor import transports

    cli_options.refuse_memory_broker(config, "dead letters", "/console/dead-letters")
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (one object per dead letter) for scripts.")
def dlq_list(topic: str, limit: int, as_json: bool, **flags: Any) -> None:
    """List dead letters of TOPIC (they stay in place), oldest first.

    \b
    Columns:
      EVENT ID    the CloudEvent id (- for a message that is no valid CloudEvent)
      HANDLER     the handler that dead-lettered it
      ERROR TYPE  Rejected, InvalidMessage, TooManyDeliveries, DeliveryLimit, or the exception's class
      ATTEMPTS    attempts spent before it was dead-lettered
      AT          when it was dead-lettered (UTC)
      ERROR       the reason, cut to 60 characters (dlq show EVENT_ID prints all of it)

    At most --limit are listed; a line on stderr says when the limit was reached.
    """
    from conveyor.runtime import dead_letters

    select = _chosen(flags)
    config = cli_options.load(**flags)
    found = asyncio.run(
        _with_transport(config, lambda t, h: dead_letters.peek(t, topic, limit=limit, held=h, select=select))
    )
    if len(found) >= limit:
        click.echo(f"listed the first {limit} dead letters of {topic}; there may be more: raise --limit", err=True)
    if as_json:
        click.echo(orjson.dumps([_as_dict(d) for d in found]).decode())
        return
    if not found:
        click.echo(f"no dead letters for {topic}")
        return
    rows: list[tuple[str, ...]] = [("EVENT ID", "HANDLER", "ERROR TYPE", "ATTEMPTS", "AT", "ERROR")]
    rows += [(d.event_id or "-", d.handler, d.error_type, d.attempts, d.at, d.error[:60]) for d in found]
    schedules_cli.print_table(rows)


def _as_dict(letter: Any) -> dict[str, Any]:
    """A dead letter as a JSON object (``dlq list --json``)."""
    return {
        "event_id": letter.event_id,
        "topic": letter.topic,
        "handler": letter.handler,
        "error_type": letter.error_type,
        "error": letter.error,
        "attempts": letter.attempts,
        "at": letter.at,
        "held": letter.held_id is not None,
    }


@dlq.command(name="show")
@_dlq_command
@click.argument("event_id")
def dlq_show(topic: str, event_id: str, limit: int, **flags: Any) -> None:
    """Show one dead letter of TOPIC: the reason, the headers and the body."""
    from conveyor.runtime import dead_letters

    select = dead_letters.both(_chosen(flags), dead_letters.matching(event_id=event_id))
    config = cli_options.load(**flags)
    found = asyncio.run(
        _with_transport(config, lambda t, h: dead_letters.peek(t, topic, limit=limit, held=h, select=select))
    )
    match = next((d for d in found if d.event_id == event_id), None)
    if match is None:
        raise errors.NotFound(f"no dead letter with event id {event_id!r} among the dead letters of {topic}")
    click.echo(f"topic: {match.topic}\nhandler: {match.handler}\nerror: {match.error_type}: {match.error}")
    click.echo(f"attempts: {match.attempts}\ndead-lettered at: {match.at}\nheaders:")
    for name, value in sorted(match.message.headers.items()):
        click.echo(f"  {name}: {value}")
    click.echo("body:\n" + match.message.body.decode("utf-8", errors="replace"))


@dlq.command(name="replay")
@_dlq_command
def dlq_replay(topic: str, limit: int, **flags: Any) -> None:
    """Send up to --limit dead letters of TOPIC back to the topic they failed on.

    Only those kept when the replay starts: one dead-lettered again meanwhile waits for the next replay.
    """
    from conveyor.runtime import dead_letters

    select = _chosen(flags)
    config = cli_options.load(**flags)
    found = asyncio.run(
        _with_transport(config, lambda t, h: dead_letters.replay(t, topic, limit=limit, held=h, select=select))
    )
    click.echo(f"replayed {len(found)} dead letter(s) of {topic}")


@dlq.command(name="purge")
@_dlq_command
@click.option("--yes", is_flag=True, help="Confirm: the dead letters are deleted.")
def dlq_purge(topic: str, limit: int, yes: bool, **flags: Any) -> None:
    """Delete up to --limit dead letters of TOPIC."""
    from conveyor.runtime import dead_letters

    if not yes:
        raise click.UsageError("purging deletes dead letters: add --yes")
    select = _chosen(flags)
    config = cli_options.load(**flags)
    found = asyncio.run(
        _with_transport(config, lambda t, h: dead_letters.purge(t, topic, limit=limit, held=h, select=select))
    )
    click.echo(f"purged {len(found)} dead letter(s) of {topic}")
