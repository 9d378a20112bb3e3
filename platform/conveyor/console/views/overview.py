"""The overview: handlers' rates, errors, durations, load and backlog; relay, dead letters, cron, sagas.

The live part (``/console/overview/live``) is re-fetched every few seconds by
``static/console.js``. Broker figures come from the autoscaling signal
(:mod:`conveyor.runtime.scaling`), read in the background, and the dead
letters waiting per topic from the broker's backlog of each keeper, cached
for a few seconds: a page load never waits on the broker for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from conveyor.console import samples
from conveyor.console.site import Caller, Page, Site
from conveyor.console.views import dead_letters as dead_letter_views

log = logging.getLogger("conveyor.console")

REFRESH_SECONDS = 3
"""How often the browser refreshes the live part."""
_DLQ_CACHE_SECONDS = 5.0
_DLQ_TIMEOUT = 2.0
_NEXT_FIRES = 8


@dataclass(frozen=True, slots=True)
class HandlerRow:
    """One handler's line of the overview."""

    name: str
    topic: str
    figures: samples.Figures
    capacity: int | None
    in_flight: int | None
    backlog: int | None
    oldest_age: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class NextFire:
    """A schedule's next fire."""

    schedule: str
    at: datetime
    paused: bool


class Overview:
    """Builds the overview's figures.

    Args:
        site: the console.
        sampler: the handlers' recent history.
    """

    def __init__(self, site: Site, sampler: samples.Sampler) -> None:
        self._site = site
        self._sampler = sampler
        self._dead: tuple[float, dict[str, int | None]] = (0.0, {})

    def handlers(self) -> list[HandlerRow]:
        """Every handler of the worker (or of the application, without one), by name."""
        sources = self._site.sources
        loads: dict[str, Mapping[str, Any]] = {}
        if sources.scaling is not None:
            try:
                loads = {entry["handler"]: entry for entry in sources.scaling().get("handlers", [])}
            except Exception:  # the figures are optional; the page is not
                log.exception("console: the scaling snapshot failed")
        topics = {h.name: h.topic for h in sources.app.handlers} | {k: v.get("topic", "") for k, v in loads.items()}
        rows = []
        for name in sorted(topics):
            load = loads.get(name, {})
            rows.append(
                HandlerRow(
                    name=name,
                    topic=topics[name],
                    figures=self._sampler.figures(name),
                    capacity=load.get("capacity"),
                    in_flight=load.get("in_flight"),
                    backlog=load.get("backlog"),
                    oldest_age=load.get("oldest_age_seconds"),
                    error=load.get("error"),
                )
            )
        return rows

    async def dead_letters(self) -> dict[str, int | None]:
        """Dead letters waiting per topic (None where unknown), cached a few seconds."""
        read_at, counts = self._dead
        if time.monotonic() - read_at < _DLQ_CACHE_SECONDS:
            return counts
        try:
            async with asyncio.timeout(_DLQ_TIMEOUT):
                counts = await dead_letter_views.waiting(self._site.sources)
        except TimeoutError:
            counts = dict.fromkeys(self._site.sources.dead_letter_topics())
        self._dead = (time.monotonic(), counts)
        return counts

    async def live(self) -> dict[str, Any]:
        """Every figure of the live part."""
        stores = self._site.sources.stores
        relay = await self._site.sources.outbox.stats()
        async with stores.database.transaction(readonly=True) as tx:
            now = await stores.schedules.now(tx)
            states = await stores.schedules.states(tx)
            counts = await stores.sagas.counts(tx)
        fires = []
        for schedule in self._site.sources.app.schedules:
            state = states.get(schedule.name)
            fires += [NextFire(schedule.name, at, bool(state and state.paused)) for at in schedule.next_fires(now, 1)]
        fires.sort(key=lambda fire: fire.at)
        sagas: dict[str, dict[str, int]] = {}
        for (saga, status), number in sorted(counts.items()):
            sagas.setdefault(saga, {})[status] = number
        dead = await self.dead_letters()
        return {
            "handlers": self.handlers(),
            "relay": relay,
            "dead": dead,
            "dead_total": sum(n for n in dead.values() if n),
            "fires": fires[:_NEXT_FIRES],
            "sagas": sagas,
            "saga_statuses": ["running", "compensating", "completed", "compensated", "failed"],
            "refresh": REFRESH_SECONDS,
        }


def routes(site: Site, sampler: samples.Sampler) -> list[Route]:
    """``/`` (the overview) and ``/overview/live`` (its live part)."""
    overview = Overview(site, sampler)

    async def page(request: Request, caller: Caller) -> Page:
        return Page("overview.html", {"nav": "overview", **await overview.live()})

    async def live(request: Request, caller: Caller) -> Page:
        return Page("_overview_live.html", await overview.live())

    return [
        Route("/", site.page(page), methods=["GET"], name="overview"),
        Route("/overview/live", site.page(live), methods=["GET"]),
    ]
