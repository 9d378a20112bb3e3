"""Schedules: trigger in words, next fires (UTC, and the viewer's zone in the browser), recent runs; pause,
resume, trigger now (as ``conveyor schedules pause|resume|trigger`` do, for every scheduler replica)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from starlette.requests import Request
from starlette.routing import Route

from conveyor import persistence
from conveyor.console import filters, inputs
from conveyor.console.site import PREFIX, ActionHandler, Caller, Done, Page, Site
from conveyor.runtime import scheduler
from conveyor.scheduling.schedules import Schedule

RUNS = 5
"""Recent runs shown per schedule."""
FIRES = 3
"""Next fires shown per schedule."""


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One schedule as the page shows it."""

    schedule: Schedule
    words: str
    paused: bool
    fires: list[datetime]
    runs: list[persistence.Run]


def duration(run: persistence.Run) -> float | None:
    """Seconds a run took, if it started and finished."""
    if run.started_at is None or run.finished_at is None:
        return None
    return (run.finished_at - run.started_at).total_seconds()


def _interval(schedule: Schedule) -> timedelta | None:
    value = getattr(schedule.trigger, "interval", None)
    return value if isinstance(value, timedelta) else None


def routes(site: Site) -> list[Route]:
    """The schedules page and its actions."""
    stores = site.sources.stores

    def pick(request: Request) -> Schedule:
        known = {s.name: s for s in site.sources.app.schedules}
        return known[inputs.known("schedule name", request.path_params["name"], "name", known)]

    async def page(request: Request, caller: Caller) -> Page:
        rows = []
        async with stores.database.transaction(readonly=True) as tx:
            now = await stores.schedules.now(tx)
            states = await stores.schedules.states(tx)
            for schedule in site.sources.app.schedules:
                state = states.get(schedule.name)
                rows.append(
                    ScheduleRow(
                        schedule=schedule,
                        words=filters.trigger_words(schedule.expression, schedule.tz, _interval(schedule)),
                        paused=bool(state and state.paused),
                        fires=schedule.next_fires(now, FIRES),
                        runs=await stores.schedules.history(tx, schedule.name, limit=RUNS),
                    )
                )
        return Page("schedules.html", {"nav": "schedules", "rows": rows, "duration": duration})

    def pause_or_resume(paused: bool) -> ActionHandler:
        async def act(request: Request, caller: Caller, form: inputs.Form) -> Done:
            schedule = pick(request)
            async with stores.database.transaction() as tx:
                await stores.schedules.set_paused(tx, schedule.name, paused)
            verb = "paused" if paused else "resumed"
            return Done(
                f"{schedule.name} {verb} on every scheduler replica", f"{PREFIX}/schedules", {verb: schedule.name}
            )

        return act

    async def trigger(request: Request, caller: Caller, form: inputs.Form) -> Done:
        schedule = pick(request)
        run_id = await scheduler.trigger_now(stores, schedule, site.sources.service)
        return Done(f"{schedule.name} triggered (run {run_id})", f"{PREFIX}/schedules", {"run_id": run_id})

    return [
        Route("/schedules", site.page(page), methods=["GET"]),
        Route("/schedules/{name}/pause", site.action("schedules.pause", pause_or_resume(True)), methods=["POST"]),
        Route("/schedules/{name}/resume", site.action("schedules.resume", pause_or_resume(False)), methods=["POST"]),
        Route("/schedules/{name}/trigger", site.action("schedules.trigger", trigger), methods=["POST"]),
    ]
