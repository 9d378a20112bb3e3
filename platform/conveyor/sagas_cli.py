"""``conveyor sagas``: list and show saga instances; retry a parked one, abort a running one.

``list`` and ``show`` read the service's database. ``retry`` and ``abort``
write an operator signal to the saga's topic through the outbox (so the relay
must run, as it does in production and in ``conveyor run``); the saga's
handler applies it like any other signal, in order with the instance's replies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import click

from conveyor import cli_options, envelope, errors, persistence, schedules_cli, settings
from conveyor.runtime import app
from conveyor.sagas import definition, engine, wire
from conveyor.sagas.store import LogRecord, SagaRecord, SagaStore

_STATUSES = [s.value for s in engine.Status]
_WIDTH = 60


async def _open(config: settings.Settings, stack: contextlib.AsyncExitStack) -> persistence.Persistence:
    return await app.open_persistence(config, stack)


async def find(config: settings.Settings, saga: str | None, status: str | None, limit: int) -> list[SagaRecord]:
    """Instances, most recently changed first."""
    async with contextlib.AsyncExitStack() as stack:
        stores = await _open(config, stack)
        async with stores.database.transaction(readonly=True) as tx:
            sagas = _store(stores)
            return await sagas.find(tx, saga=saga, status=status, limit=limit)


def _store(stores: persistence.Persistence) -> SagaStore:
    return stores.sagas


async def one(config: settings.Settings, instance: str, saga: str | None) -> tuple[SagaRecord, list[LogRecord]]:
    """The instance called ``instance`` (of ``saga`` when several sagas have one) and its step log.

    Raises:
        NotFound: no such instance, or several and no ``saga`` to choose.
    """
    async with contextlib.AsyncExitStack() as stack:
        stores = await _open(config, stack)
        async with stores.database.transaction(readonly=True) as tx:
            sagas = _store(stores)
            record = await _pick(sagas, tx, instance, saga)
            return record, await sagas.history(tx, record.instance.saga, instance)


async def _pick(sagas: SagaStore, tx: Any, instance: str, saga: str | None) -> SagaRecord:
    if saga is not None:
        record = await sagas.load(tx, saga, instance)
        if record is None:
            raise errors.NotFound(f"no instance {instance!r} of saga {saga!r}")
        return record
    matches = [r for r in await sagas.find(tx, limit=10_000) if r.instance.id == instance]
    if not matches:
        raise errors.NotFound(f"no saga instance {instance!r}")
    if len(matches) > 1:
        names = ", ".join(r.instance.saga for r in matches)
        raise errors.NotFound(f"several sagas have an instance {instance!r} ({names}): give --saga")
    return matches[0]


async def signal(config: settings.Settings, instance: str, saga: str | None, action: str) -> SagaRecord:
    """Open the service's database and :func:`request` ``action`` for the instance."""
    async with contextlib.AsyncExitStack() as stack:
        return await request(await _open(config, stack), instance, saga, action, config.service)


async def request(
    stores: persistence.Persistence, instance: str, saga: str | None, action: str, source: str
) -> SagaRecord:
    """Write an operator's ``retry`` or ``abort`` for the instance to the outbox; return the instance.

    Raises:
        NotFound: no such instance.
        ConfigurationError: the instance is not parked (retry) or not running (abort).
    """
    wanted = engine.Status.FAILED if action == "retry" else engine.Status.RUNNING
    async with stores.database.transaction() as tx:
        record = await _pick(_store(stores), tx, instance, saga)
        if record.instance.status is not wanted:
            raise errors.ConfigurationError(
                f"saga {record.instance.saga} {instance} is {record.instance.status.value}: "
                f"only a {wanted.value} instance can be {'retried' if action == 'retry' else 'aborted'}"
            )
        event = envelope.create(
            wire.CONTROL, {"action": action}, source=source, key=instance,
            extensions={wire.INSTANCE: instance, wire.ACTION: action},
        )  # fmt: skip
        await stores.outbox.add(tx, definition.TOPIC_PREFIX + record.instance.saga, event)
    return record


def _short(text: str | None) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= _WIDTH else flat[: _WIDTH - 3] + "..."


def table(records: Sequence[SagaRecord]) -> list[tuple[str, ...]]:
    """Rows of ``conveyor sagas list``, a header first."""
    rows: list[tuple[str, ...]] = [("SAGA", "ID", "STATUS", "STEP", "UPDATED (UTC)", "ERROR")]
    for record in records:
        i = record.instance
        rows.append((i.saga, i.id, i.status.value, str(i.step), _time(record), _short(i.error)))
    return rows


def _time(record: SagaRecord) -> str:
    return envelope.format_time(record.updated_at.replace(microsecond=0))


def describe(record: SagaRecord, history: Sequence[LogRecord]) -> str:
    """The text of ``conveyor sagas show``: status, error, state and the step log."""
    i = record.instance
    lines = [
        f"saga: {i.saga}", f"id: {i.id}", f"status: {i.status.value}", f"step: {i.step}",
        f"waiting for: {i.waiting or '-'}", f"until: {envelope.format_time(i.deadline) if i.deadline else '-'}",
        f"error: {i.error or '-'}", f"version: {i.version}",
        f"created at: {envelope.format_time(record.created_at)}", f"updated at: {_time(record)}",
        "state:", *(f"  {k}: {v!r}" for k, v in sorted(i.state.items())), "log:",
    ]  # fmt: skip
    for line in history:
        e = line.entry
        token = f" [{e.token}]" if e.token else ""
        lines.append(f"  {envelope.format_time(line.at)}  {e.step or '-'}  {e.event}{token}  {e.detail or ''}".rstrip())
    return "\n".join(lines)


@click.group()
def sagas() -> None:
    """Saga instances: list, show; retry a parked one, abort a running one."""


def _command(func: cli_options.F) -> cli_options.F:
    func = click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")(func)
    return cli_options.common(cli_options.exits(func))


@sagas.command(name="list")
@click.option("--status", type=click.Choice(_STATUSES), help="Only instances in this status.")
@click.option("--saga", help="Only instances of this saga.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_command
def sagas_list(status: str | None, saga: str | None, limit: int, **flags: Any) -> None:
    """List saga instances, most recently changed first."""
    found = asyncio.run(find(cli_options.load(**flags), saga, status, limit))
    if not found:
        click.echo("no saga instances" + (f" with status {status}" if status else ""))
        return
    schedules_cli.print_table(table(found))


@sagas.command(name="show")
@click.argument("instance_id")
@click.option("--saga", help="The saga, when several have an instance with this id.")
@_command
def sagas_show(instance_id: str, saga: str | None, **flags: Any) -> None:
    """Show an instance: status, error, state and its step log."""
    record, history = asyncio.run(one(cli_options.load(**flags), instance_id, saga))
    click.echo(describe(record, history))


@sagas.command(name="retry")
@click.argument("instance_id")
@click.option("--saga", help="The saga, when several have an instance with this id.")
@_command
def sagas_retry(instance_id: str, saga: str | None, **flags: Any) -> None:
    """Resume a parked (failed) instance: its undos run again from where they stopped."""
    record = asyncio.run(signal(cli_options.load(**flags), instance_id, saga, "retry"))
    click.echo(f"saga {record.instance.saga} {instance_id}: retry sent")


@sagas.command(name="abort")
@click.argument("instance_id")
@click.option("--saga", help="The saga, when several have an instance with this id.")
@_command
def sagas_abort(instance_id: str, saga: str | None, **flags: Any) -> None:
    """Abort a running instance: what it did is undone (the step it waits for included)."""
    record = asyncio.run(signal(cli_options.load(**flags), instance_id, saga, "abort"))
    click.echo(f"saga {record.instance.saga} {instance_id}: abort sent")
