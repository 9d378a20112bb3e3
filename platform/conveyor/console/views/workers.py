"""Workers: the live processes of the service, from their heartbeats (see :mod:`conveyor.heartbeats`).

Every process with the service's database appears: host, pid, roles, the
handlers it consumes for, messages in flight and its last heartbeat. One that
missed a few beats is shown as gone until its row is purged. The table (``/workers/live``)
is re-fetched every few seconds by ``static/console.js``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from conveyor import heartbeats
from conveyor.console.site import Caller, Page, Site
from conveyor.console.views.overview import REFRESH_SECONDS


def routes(site: Site) -> list[Route]:
    """``/workers`` and ``/workers/live`` (its table)."""
    here = (socket.gethostname(), os.getpid())

    async def live() -> dict[str, Any]:
        seen = await site.sources.stores.heartbeats.seen()
        return {
            "workers": seen,
            "here": here,
            "alive": sum(not s.gone for s in seen),
            "gone_after": heartbeats.EVERY.total_seconds() * heartbeats.GONE_AFTER_BEATS,
            "refresh": REFRESH_SECONDS,
        }

    async def page(request: Request, caller: Caller) -> Page:
        return Page("workers.html", {"nav": "workers", **await live()})

    async def table(request: Request, caller: Caller) -> Page:
        return Page("_workers_live.html", await live())

    return [
        Route("/workers", site.page(page), methods=["GET"]),
        Route("/workers/live", site.page(table), methods=["GET"]),
    ]
