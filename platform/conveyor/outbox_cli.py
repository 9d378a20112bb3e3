"""``conveyor outbox``: count, list and show unsent outbox messages; retry or purge parked ones.

The relay parks a message the broker refused ``CONVEYOR_RELAY_MAX_ATTEMPTS``
times; a parked message holds back the later messages of its key until an
operator retries it (it goes first again) or purges it (the key moves on
without it). These commands talk to the :class:`~conveyor.stores.OutboxStore`
port of the service's database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import click
import orjson

from conveyor import cli_options, envelope, schedules_cli, settings, stores
from conveyor.runtime import app

T = TypeVar("T")
_ERROR_WIDTH = 60


async def run(config: settings.Settings, operation: Callable[[stores.OutboxStore], Awaitable[T]]) -> T:
    """Open the service's outbox, run ``operation`` on it, close it.

    Raises:
        ConfigurationError: unmigrated database.
        NotFound: the operation named a message that is not there.
        StoreError: the database failed.
    """
    async with contextlib.AsyncExitStack() as stack:
        return await operation(await app.open_outbox_store(config, stack))


def chosen(message_ids: Sequence[str], every: bool) -> list[str] | None:
    """The message ids a retry or purge applies to; None means every parked message.

    Raises:
        click.UsageError: both ids and ``--all``, or neither.
    """
    if every and message_ids:
        raise click.UsageError("give MESSAGE_ID... or --all, not both")
    if not every and not message_ids:
        raise click.UsageError("give the MESSAGE_ID(s) to act on, or --all for every parked message")
    return None if every else list(message_ids)


def _time(value: datetime | None) -> str:
    return "-" if value is None else envelope.format_time(value.replace(microsecond=0))


def _one_line(text: str | None, width: int) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def shown_status(entry: stores.OutboxEntry, now: datetime) -> str:
    """``parked``, ``scheduled`` (not due yet) or ``due`` (the relay may publish it now); ``sent`` if sent."""
    if entry.status != "pending":
        return entry.status
    return "scheduled" if entry.available_at > now else "due"


def table(entries: Sequence[stores.OutboxEntry], now: datetime | None = None) -> list[tuple[str, ...]]:
    """Rows for ``conveyor outbox list``, a header first."""
    now = now or datetime.now(UTC)
    rows: list[tuple[str, ...]] = [("MESSAGE ID", "STATUS", "TOPIC", "KEY", "ATTEMPTS", "SINCE / DUE", "LAST ERROR")]
    for entry in entries:
        message = entry.message
        when = entry.parked_at if entry.status == "parked" else entry.available_at
        rows.append(
            (
                message.message_id,
                shown_status(entry, now),
                message.topic,
                message.key or "-",
                str(message.attempts),
                _time(when),
                _one_line(entry.last_error, _ERROR_WIDTH),
            )
        )
    return rows


def as_json(entry: stores.OutboxEntry, now: datetime) -> dict[str, Any]:
    """One row as ``conveyor outbox list --json`` prints it (no body: ``outbox show`` has it)."""
    message = entry.message
    return {
        "message_id": message.message_id, "status": shown_status(entry, now), "topic": message.topic,
        "key": message.key, "attempts": message.attempts, "created_at": _iso(message.created_at),
        "due_at": _iso(entry.available_at), "parked_at": _iso(entry.parked_at), "last_error": entry.last_error,
    }  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    return None if value is None else envelope.format_time(value)


def _more(limit: int, what: str) -> None:
    click.echo(f"conveyor: listed the first {limit} {what}; there are more: raise --limit or filter", err=True)


def _body(body: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


def describe(entry: stores.OutboxEntry) -> str:
    """The text of ``conveyor outbox show``: status, attempts, last error, headers, body."""
    message = entry.message
    lines = [
        f"message id: {message.message_id}",
        f"status: {entry.status}",
        f"topic: {message.topic}",
        f"key: {message.key or '-'}",
        f"attempts: {message.attempts}",
        f"created at: {_time(message.created_at)}",
        f"due at: {_time(entry.available_at)}",
        f"parked at: {_time(entry.parked_at)}",
        f"sent at: {_time(entry.sent_at)}",
        f"last error: {entry.last_error or '-'}",
        "headers:",
        *(f"  {name}: {value}" for name, value in sorted(message.headers.items())),
        "body:",
        _body(message.body),
    ]
    return "\n".join(lines)


@click.group()
def outbox() -> None:
    """Unsent outbox messages: topics, list, show; retry or purge the parked ones."""


def _outbox_command(func: cli_options.F) -> cli_options.F:
    func = click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")(func)
    return cli_options.common(cli_options.exits(func))


@outbox.command(name="list")
@click.option("--parked", is_flag=True, help="Only parked messages (they wait for retry or purge).")
@click.option("--topic", help="Only messages to this topic.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most messages listed; if there are more, stderr says so.")  # fmt: skip
@click.option("--json", "json_out", is_flag=True, help="Print a JSON array of objects instead of a table.")
@_outbox_command
def outbox_list(parked: bool, topic: str | None, limit: int, json_out: bool, **flags: Any) -> None:
    """List unsent outbox messages, oldest first: status, attempts, last error.

    \b
    STATUS       due: the relay may publish it now (unless a parked
                   message of its key holds it back)
                 scheduled: not due yet: a delayed message (saga step
                   timeouts among them) or a failed publish backing off
                 parked: refused CONVEYOR_RELAY_MAX_ATTEMPTS times; it
                   waits for `outbox retry` or `outbox purge`
    SINCE / DUE  when a parked message was parked; else when it is due
    ATTEMPTS     publishes the broker refused so far

    The first --limit messages are listed; when there are more, a line on
    stderr says so.
    """
    status: Literal["parked"] | None = "parked" if parked else None
    found = asyncio.run(
        run(cli_options.load(**flags), lambda store: store.entries(status=status, topic=topic, limit=limit + 1))
    )
    shown, now = found[:limit], datetime.now(UTC)
    if json_out:
        click.echo(orjson.dumps([as_json(entry, now) for entry in shown]).decode())
    elif not shown:
        click.echo("no parked outbox messages" if parked else "no unsent outbox messages")
    else:
        schedules_cli.print_table(table(shown, now))
    if len(found) > limit:
        _more(limit, "messages")


@outbox.command(name="topics")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most topics listed (by name); if there are more, stderr says so.")  # fmt: skip
@click.option("--json", "json_out", is_flag=True, help="Print a JSON array of objects instead of a table.")
@_outbox_command
def outbox_topics(limit: int, json_out: bool, **flags: Any) -> None:
    """Count unsent messages per topic, every topic with unsent messages, by name.

    \b
    UNSENT     DUE + SCHEDULED + PARKED
    DUE        the relay may publish them now
    SCHEDULED  not due yet: delayed messages, saga timers, backoffs
    PARKED     waiting for `outbox retry` or `outbox purge`
    """
    found = asyncio.run(run(cli_options.load(**flags), lambda store: store.topics(limit + 1)))
    shown = found[:limit]
    if json_out:
        rows = [{"topic": r.topic, "unsent": r.unsent, "due": r.due, "scheduled": r.scheduled, "parked": r.parked}
                for r in shown]  # fmt: skip
        click.echo(orjson.dumps(rows).decode())
    elif not shown:
        click.echo("no unsent outbox messages")
    else:
        cells = [(r.topic, str(r.unsent), str(r.due), str(r.scheduled), str(r.parked)) for r in shown]
        schedules_cli.print_table([("TOPIC", "UNSENT", "DUE", "SCHEDULED", "PARKED"), *cells])
    if len(found) > limit:
        _more(limit, "topics")


@outbox.command(name="show")
@click.argument("message_id")
@_outbox_command
def outbox_show(message_id: str, **flags: Any) -> None:
    """Show one outbox message: status, attempts, last error, headers and body."""
    entry = asyncio.run(run(cli_options.load(**flags), lambda store: store.get(message_id)))
    click.echo(describe(entry))


@outbox.command(name="retry")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every parked message.")
@_outbox_command
def outbox_retry(message_ids: tuple[str, ...], every: bool, **flags: Any) -> None:
    """Publish MESSAGE_ID(s) again now, attempts reset (--all: every parked message), ahead of their key."""
    picked = chosen(message_ids, every)
    count = asyncio.run(run(cli_options.load(**flags), lambda store: store.retry(picked)))
    click.echo(f"{count} outbox message(s) will be published again")


@outbox.command(name="purge")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every parked message.")
@click.option("--yes", is_flag=True, help="Confirm: the messages are deleted, never published.")
@_outbox_command
def outbox_purge(message_ids: tuple[str, ...], every: bool, yes: bool, **flags: Any) -> None:
    """Delete parked MESSAGE_ID(s) (--all: every parked one); the later messages of their keys move on."""
    picked = chosen(message_ids, every)
    if not yes:
        raise click.UsageError("purging deletes parked messages for good: add --yes")
    count = asyncio.run(run(cli_options.load(**flags), lambda store: store.purge_parked(picked)))
    click.echo(f"purged {count} parked outbox message(s)")
