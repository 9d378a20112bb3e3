"""``conveyor schedules``: list schedules with their next fires and last run; trigger, pause, resume.

``conveyor schedules list`` is the listing; bare ``conveyor schedules`` prints
the same table and stays for scripts written before ``list`` existed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click
import orjson

from conveyor import cli_options, envelope, persistence, registry, settings
from conveyor.runtime import app, scheduler
from conveyor.scheduling.schedules import Schedule

HEADER = ("NAME", "EXPRESSION", "TZ", "NEXT FIRES (UTC)", "LAST RUN", "STATE")

_COLUMNS = """\b
Columns:
  NAME              the schedule's name (give it to trigger, pause, resume)
  EXPRESSION        its cron expression, or "every H:MM:SS"
  TZ                the time zone the expression is read in
  NEXT FIRES (UTC)  its next three fire times, from the database's clock
  LAST RUN          the fire time of its latest run and that run's status:
                    claimed (not started yet), started (running), succeeded,
                    failed, or skipped
  STATE             active, or paused (on every scheduler replica)
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One schedule's line of ``conveyor schedules list``.

    Attributes:
        name: the schedule's name.
        expression: its cron expression or interval.
        tz: its time zone.
        next_fires: its next three fire times (UTC).
        last_fire: the fire time of its latest run, if any.
        last_status: that run's status.
        paused: whether it is paused.
    """

    name: str
    expression: str
    tz: str
    next_fires: tuple[datetime, ...]
    last_fire: datetime | None
    last_status: str | None
    paused: bool

    def cells(self) -> tuple[str, ...]:
        """The row as table cells, in :data:`HEADER`'s order."""
        last = f"{_short(self.last_fire)} {self.last_status}" if self.last_fire is not None else "-"
        fires = ", ".join(_short(f) for f in self.next_fires)
        return (self.name, self.expression, self.tz, fires, last, "paused" if self.paused else "active")

    def as_json(self) -> dict[str, object]:
        """The row as a JSON object (times in RFC 3339, UTC)."""
        return {
            "name": self.name,
            "expression": self.expression,
            "tz": self.tz,
            "next_fires": [envelope.format_time(f) for f in self.next_fires],
            "last_run": None
            if self.last_fire is None
            else {"fire_time": envelope.format_time(self.last_fire), "status": self.last_status},
            "state": "paused" if self.paused else "active",
        }


async def _stores(config: settings.Settings, stack: contextlib.AsyncExitStack) -> persistence.Persistence:
    return await app.open_persistence(config, stack)


async def overview(config: settings.Settings, found: registry.Registry) -> list[Row]:
    """One row per schedule: name, expression, zone, next three fires, last run, state."""
    rows: list[Row] = []
    async with contextlib.AsyncExitStack() as stack:
        stores = await _stores(config, stack)
        claims = stores.schedules
        async with stores.database.transaction(readonly=True) as tx:
            now = await claims.now(tx)
            states = await claims.states(tx)
            for schedule in found.schedules:
                last = await claims.history(tx, schedule.name, limit=1)
                state = states.get(schedule.name)
                rows.append(
                    Row(
                        schedule.name,
                        schedule.expression,
                        schedule.tz,
                        tuple(schedule.next_fires(now, 3)),
                        last[0].fire_time if last else None,
                        last[0].status if last else None,
                        bool(state and state.paused),
                    )
                )
    return rows


def _short(value: datetime) -> str:
    return envelope.format_time(value.replace(microsecond=0))


async def trigger(config: settings.Settings, schedule: Schedule) -> int:
    """Enqueue one run of ``schedule`` now; return the run id."""
    async with contextlib.AsyncExitStack() as stack:
        return await scheduler.trigger_now(await _stores(config, stack), schedule, config.service)


async def set_paused(config: settings.Settings, schedule: Schedule, paused: bool) -> None:
    """Pause or resume ``schedule`` for every scheduler replica."""
    async with contextlib.AsyncExitStack() as stack:
        stores = await _stores(config, stack)
        async with stores.database.transaction() as tx:
            await stores.schedules.set_paused(tx, schedule.name, paused)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Echo rows as aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _options(func: cli_options.F) -> cli_options.F:
    return cli_options.common(cli_options.database(func))


def _flags(click_context: click.Context, flags: dict[str, Any]) -> dict[str, Any]:
    """The subcommand's flags over the group's (``schedules --app X list`` and ``schedules list --app X``)."""
    given = dict(click_context.obj or {})
    given.update({key: value for key, value in flags.items() if value is not None})
    return given


def _list(flags: dict[str, Any], as_json: bool) -> None:
    config = cli_options.load(**flags)
    found = registry.discover(config.app, config.app_dir)
    if not found.schedules:
        if as_json:
            click.echo("[]")
        else:
            click.echo(f"no schedules in {', '.join(config.app)}")
        return
    rows = asyncio.run(overview(config, found))
    if as_json:
        click.echo(orjson.dumps([row.as_json() for row in rows], option=orjson.OPT_INDENT_2).decode())
        return
    print_table([HEADER, *(row.cells() for row in rows)])


@click.group(
    invoke_without_command=True,
    help="Schedules: list them, or trigger, pause or resume one. Bare `conveyor schedules` is "
    "`conveyor schedules list` (kept for scripts).",
)
@_options
@click.pass_context
@cli_options.exits
def schedules(click_context: click.Context, /, **flags: Any) -> None:
    click_context.obj = flags
    if click_context.invoked_subcommand is None:
        _list(flags, as_json=False)


@schedules.command(
    name="list",
    help="List schedules: expression, time zone, next three fires, last run and its status, state.\n\n"
    + _COLUMNS
    + "\nEvery schedule of the application is listed (there is no row limit).",
)
@_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per schedule.")
@click.pass_context
@cli_options.exits
def schedules_list(click_context: click.Context, /, as_json: bool, **flags: Any) -> None:
    _list(_flags(click_context, flags), as_json)


def _schedule_command(verb: str, help_text: str) -> Callable[[Callable[..., Any]], Any]:
    def decorate(func: Callable[..., Any]) -> Any:
        return schedules.command(name=verb, help=help_text)(
            click.argument("name")(_options(click.pass_context(cli_options.exits(func))))
        )

    return decorate


@_schedule_command("trigger", "Run schedule NAME once now (its job goes through the outbox to a worker).")
def schedules_trigger(click_context: click.Context, name: str, **flags: Any) -> None:
    config = cli_options.load(**_flags(click_context, flags))
    schedule = registry.discover(config.app, config.app_dir).schedule(name)
    run_id = asyncio.run(trigger(config, schedule))
    click.echo(f"triggered {name} (run {run_id})")


@_schedule_command("pause", "Pause schedule NAME on every scheduler replica.")
def schedules_pause(click_context: click.Context, name: str, **flags: Any) -> None:
    config = cli_options.load(**_flags(click_context, flags))
    asyncio.run(set_paused(config, registry.discover(config.app, config.app_dir).schedule(name), True))
    click.echo(f"paused {name}")


@_schedule_command("resume", "Resume schedule NAME; fires missed while paused are not run.")
def schedules_resume(click_context: click.Context, name: str, **flags: Any) -> None:
    config = cli_options.load(**_flags(click_context, flags))
    asyncio.run(set_paused(config, registry.discover(config.app, config.app_dir).schedule(name), False))
    click.echo(f"resumed {name}")
