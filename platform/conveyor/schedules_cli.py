"""``conveyor schedules``: list schedules with their next fires and last run; trigger, pause, resume."""

from __future__ import annotations

import contextlib
from datetime import datetime

import click

from conveyor import envelope, persistence, registry, settings
from conveyor.runtime import app, scheduler
from conveyor.scheduling.schedules import Schedule


async def _stores(config: settings.Settings, stack: contextlib.AsyncExitStack) -> persistence.Persistence:
    return await app.open_persistence(config, stack)


async def overview(config: settings.Settings, found: registry.Registry) -> list[tuple[str, ...]]:
    """One row per schedule: name, expression, zone, next three fires, last run, state."""
    rows: list[tuple[str, ...]] = []
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
                    (
                        schedule.name,
                        schedule.expression,
                        schedule.tz,
                        ", ".join(_short(f) for f in schedule.next_fires(now, 3)),
                        f"{_short(last[0].fire_time)} {last[0].status}" if last else "-",
                        "paused" if state and state.paused else "active",
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


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Echo rows as aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
