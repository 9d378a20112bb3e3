"""``conveyor sagas``: list and show saga instances; retry failed (parked) ones, abort running ones.

``list`` and ``show`` read the service's database. ``retry`` and ``abort``
write an operator signal to the saga's topic through the outbox (so the relay
must run, as it does in production and in ``conveyor run``); the saga's
handler applies it like any other signal, in order with the instance's replies.
With ``--all`` (and ``--yes``) they signal every failed (retry) or running
(abort) instance, of one saga with ``--saga``, in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import click
import orjson

from conveyor import cli_options, envelope, errors, persistence, schedules_cli, settings
from conveyor.runtime import app
from conveyor.sagas import definition, engine, wire
from conveyor.sagas.store import LogRecord, SagaRecord, SagaStore

_STATUSES = [s.value for s in engine.Status]
_WIDTH = 60


async def _open(config: settings.Settings, stack: contextlib.AsyncExitStack) -> persistence.Persistence:
    return await app.open_persistence(config, stack)


async def find(config: settings.Settings, saga: str | None, status: str | None, limit: int | None) -> list[SagaRecord]:
    """Instances, most recently changed first (``limit`` None: all)."""
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


async def signal_all(config: settings.Settings, saga: str | None, action: str) -> list[SagaRecord]:
    """Open the service's database and :func:`request_all` ``action``."""
    async with contextlib.AsyncExitStack() as stack:
        return await request_all(await _open(config, stack), saga, action, config.service)


def _wanted(action: str) -> engine.Status:
    return engine.Status.FAILED if action == "retry" else engine.Status.RUNNING


async def _send(stores: persistence.Persistence, tx: Any, record: SagaRecord, action: str, source: str) -> None:
    instance = record.instance.id
    event = envelope.create(
        wire.CONTROL, {"action": action}, source=source, key=instance,
        extensions={wire.INSTANCE: instance, wire.ACTION: action},
    )  # fmt: skip
    await stores.outbox.add(tx, definition.TOPIC_PREFIX + record.instance.saga, event)


async def request(
    stores: persistence.Persistence, instance: str, saga: str | None, action: str, source: str
) -> SagaRecord:
    """Write an operator's ``retry`` or ``abort`` for the instance to the outbox; return the instance.

    Raises:
        NotFound: no such instance.
        ConfigurationError: the instance is not failed (retry) or not running (abort).
    """
    wanted = _wanted(action)
    async with stores.database.transaction() as tx:
        record = await _pick(_store(stores), tx, instance, saga)
        if record.instance.status is not wanted:
            raise errors.ConfigurationError(
                f"saga {record.instance.saga} {instance} is {record.instance.status.value}: "
                f"only a {wanted.value} instance can be {'retried' if action == 'retry' else 'aborted'}"
            )
        await _send(stores, tx, record, action, source)
    return record


async def request_all(stores: persistence.Persistence, saga: str | None, action: str, source: str) -> list[SagaRecord]:
    """Write ``retry`` for every failed instance (``abort``: every running one), of ``saga`` if given.

    One transaction: every signal is written, or none. Returns the instances signalled.
    """
    async with stores.database.transaction() as tx:
        records = await _store(stores).find(tx, saga=saga, status=_wanted(action).value, limit=None)
        for record in records:
            await _send(stores, tx, record, action, source)
    return records


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
        f"error: {i.error or '-'}", f"cause: {i.cause or '-'}", f"version: {i.version}",
        f"created at: {envelope.format_time(record.created_at)}", f"updated at: {_time(record)}",
        "state:", *(f"  {k}: {v!r}" for k, v in sorted(i.state.items())), "log:",
    ]  # fmt: skip
    for line in history:
        e = line.entry
        token = f" [{e.token}]" if e.token else ""
        lines.append(f"  {envelope.format_time(line.at)}  {e.step or '-'}  {e.event}{token}  {e.detail or ''}".rstrip())
    return "\n".join(lines)


def as_json(record: SagaRecord) -> dict[str, Any]:
    """One instance as ``conveyor sagas list --json`` prints it."""
    i = record.instance
    return {
        "saga": i.saga, "id": i.id, "status": i.status.value, "step": i.step, "waiting": i.waiting,
        "deadline": envelope.format_time(i.deadline) if i.deadline else None, "error": i.error, "cause": i.cause,
        "undo_attempts": i.undo_attempts, "version": i.version,
        "created_at": envelope.format_time(record.created_at), "updated_at": envelope.format_time(record.updated_at),
    }  # fmt: skip


@click.group()
def sagas() -> None:
    """Saga instances: list, show; retry a failed (parked) one, abort a running one.

    \b
    Statuses: running (steps on their way), compensating (undoing after a
    step failed, timed out or was aborted), completed (every step done),
    compensated (every completed step undone), failed (parked: an undo kept
    failing or went unanswered; `conveyor sagas retry` resumes it).
    """


def _command(func: cli_options.F) -> cli_options.F:
    func = click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")(func)
    return cli_options.common(cli_options.exits(func))


@sagas.command(name="list")
@click.option("--status", type=click.Choice(_STATUSES), help="Only instances in this status.")
@click.option("--saga", help="Only instances of this saga.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Most instances listed; if there are more, stderr says so.")  # fmt: skip
@click.option("--json", "json_out", is_flag=True, help="Print a JSON array of objects instead of a table.")
@_command
def sagas_list(status: str | None, saga: str | None, limit: int, json_out: bool, **flags: Any) -> None:
    """List saga instances, most recently changed first.

    \b
    STATUS  running: a step's command is on its way (or local steps run)
            compensating: undoing what was done (a step failed, timed out,
              its command was dead-lettered, or an operator aborted)
            completed: every step done
            compensated: every completed step undone; ERROR says why
            failed: parked, an undo kept failing or went unanswered;
              `conveyor sagas retry` resumes it
    STEP    the step running or being undone, from 0; once completed, the
            number of steps (one past the last); once compensated, -1
            (nothing left to undo)
    ERROR   why it is compensating or parked; once compensated, why it
            compensated

    The first --limit instances are listed; when there are more, a line on
    stderr says so (narrow with --status/--saga, or raise --limit).
    """
    found = asyncio.run(find(cli_options.load(**flags), saga, status, limit + 1))
    shown = found[:limit]
    if json_out:
        click.echo(orjson.dumps([as_json(record) for record in shown]).decode())
    elif not shown:
        click.echo("no saga instances" + (f" with status {status}" if status else ""))
    else:
        schedules_cli.print_table(table(shown))
    if len(found) > limit:
        click.echo(f"conveyor: listed the first {limit} instances; there are more: raise --limit or filter", err=True)


@sagas.command(name="show")
@click.argument("instance_id")
@click.option("--saga", help="The saga, when several have an instance with this id.")
@_command
def sagas_show(instance_id: str, saga: str | None, **flags: Any) -> None:
    """Show an instance: status, error, state and its step log."""
    record, history = asyncio.run(one(cli_options.load(**flags), instance_id, saga))
    click.echo(describe(record, history))


def _act(action: str, instance_ids: tuple[str, ...], saga: str | None, every: bool, yes: bool, flags: Any) -> None:
    what = "failed" if action == "retry" else "running"
    if every and instance_ids:
        raise click.UsageError("give INSTANCE_ID... or --all, not both")
    if not every and not instance_ids:
        raise click.UsageError(f"give the INSTANCE_ID(s) to {action}, or --all for every {what} instance")
    config = cli_options.load(**flags)
    if every:
        scope = f" of saga {saga}" if saga else ""
        if not yes:
            count = len(asyncio.run(find(config, saga, what, None)))
            raise click.UsageError(f"this would {action} {count} {what} instance(s){scope}: add --yes to confirm")
        records = asyncio.run(signal_all(config, saga, action))
        click.echo(f"{action} sent to {len(records)} {what} instance(s){scope}")
        return
    for instance_id in instance_ids:
        record = asyncio.run(signal(config, instance_id, saga, action))
        click.echo(f"saga {record.instance.saga} {instance_id}: {action} sent")


@sagas.command(name="retry")
@click.argument("instance_ids", nargs=-1)
@click.option("--saga", help="The saga, when several have an instance with this id; with --all, only its instances.")
@click.option("--all", "every", is_flag=True, help="Every failed (parked) instance (of --saga, if given).")
@click.option("--yes", is_flag=True, help="Confirm --all.")
@_command
def sagas_retry(instance_ids: tuple[str, ...], saga: str | None, every: bool, yes: bool, **flags: Any) -> None:
    """Resume failed (parked) instances: their undos run again from where they stopped."""
    _act("retry", instance_ids, saga, every, yes, flags)


@sagas.command(name="abort")
@click.argument("instance_ids", nargs=-1)
@click.option("--saga", help="The saga, when several have an instance with this id; with --all, only its instances.")
@click.option("--all", "every", is_flag=True, help="Every running instance (of --saga, if given).")
@click.option("--yes", is_flag=True, help="Confirm --all.")
@_command
def sagas_abort(instance_ids: tuple[str, ...], saga: str | None, every: bool, yes: bool, **flags: Any) -> None:
    """Abort running instances: what each did is undone (the step it waits for included)."""
    _act("abort", instance_ids, saga, every, yes, flags)
