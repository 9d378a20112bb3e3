"""``conveyor outbox``: list and show unsent outbox messages; retry or purge parked ones.

The relay parks a message the broker refused ``CONVEYOR_RELAY_MAX_ATTEMPTS``
times; a parked message holds back the later messages of its key until an
operator retries it (it goes first again) or purges it (the key moves on
without it). These commands talk to the :class:`~conveyor.ports.OutboxStore`
port of the service's database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

import click
import orjson

from conveyor import envelope, ports, settings
from conveyor.runtime import app

T = TypeVar("T")
_ERROR_WIDTH = 60


async def run(config: settings.Settings, operation: Callable[[ports.OutboxStore], Awaitable[T]]) -> T:
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


def table(entries: Sequence[ports.OutboxEntry]) -> list[tuple[str, ...]]:
    """Rows for ``conveyor outbox list``, a header first."""
    rows: list[tuple[str, ...]] = [("MESSAGE ID", "STATUS", "TOPIC", "KEY", "ATTEMPTS", "SINCE / DUE", "LAST ERROR")]
    for entry in entries:
        message = entry.message
        when = entry.parked_at if entry.status == "parked" else entry.available_at
        rows.append(
            (
                message.message_id,
                entry.status,
                message.topic,
                message.key or "-",
                str(message.attempts),
                _time(when),
                _one_line(entry.last_error, _ERROR_WIDTH),
            )
        )
    return rows


def _body(body: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


def describe(entry: ports.OutboxEntry) -> str:
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
