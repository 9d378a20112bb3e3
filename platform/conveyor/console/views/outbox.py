"""The outbox: backlog by topic, parked rows with their last error; retry or purge them.

Through the :class:`~conveyor.stores.OutboxStore` port, as ``conveyor outbox``
does: a retry makes rows due now with no attempts spent (ahead of their key),
a purge deletes parked rows for good (their key moves on without them).
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.routing import Route

from conveyor.console import inputs
from conveyor.console.site import PREFIX, Caller, Done, Page, Site
from conveyor.console.views.dead_letters import pretty

MAX_LISTED = 500
"""Most rows listed on the page."""
MAX_TOPICS = 1000
"""Most topics in the backlog by topic (by name)."""


def _chosen(form: inputs.Form) -> list[str] | None:
    if inputs.one(form, "all", "") == "yes":
        if form.get("id"):
            raise inputs.Refused(400, "choose messages or every parked message, not both", "all")
        return None
    return inputs.ids(form, "id", MAX_LISTED)


def routes(site: Site) -> list[Route]:
    """The outbox pages and actions."""
    store = site.sources.outbox

    async def page(request: Request, caller: Caller) -> Page:
        query = request.query_params
        topic = query.get("topic") or None
        if topic is not None:
            inputs.name("topic", topic, "topic")
        status = inputs.choice(query.get("status"), "status", ("pending", "parked"))
        limit = inputs.count(query.get("limit"), "limit", default=100, low=1, high=MAX_LISTED)
        stats = await store.stats()
        by_topic = await store.topics(MAX_TOPICS)
        rows = await store.entries(status=status, topic=topic, limit=limit)  # type: ignore[arg-type]
        context = {
            "nav": "outbox", "stats": stats, "by_topic": by_topic, "partial": len(by_topic) >= MAX_TOPICS,
            "rows": rows, "topic": topic or "", "status": status or "", "limit": limit, "now": datetime.now(UTC),
        }  # fmt: skip
        return Page("outbox.html", context)

    async def show(request: Request, caller: Caller) -> Page:
        entry = await store.get(inputs.ident(request.query_params.get("id", ""), "id"))
        headers = sorted(entry.message.headers.items())
        return Page(
            "outbox_entry.html",
            {"nav": "outbox", "entry": entry, "headers": headers, "body": pretty(entry.message.body)},
        )

    async def retry(request: Request, caller: Caller, form: inputs.Form) -> Done:
        chosen = _chosen(form)
        count = await store.retry(chosen)
        what = "every parked message" if chosen is None else ", ".join(chosen[:20])
        return Done(f"{count} outbox message(s) will be published again ({what})", f"{PREFIX}/outbox", {"count": count})

    async def purge(request: Request, caller: Caller, form: inputs.Form) -> Done:
        if inputs.one(form, "confirm", "") != "yes":
            raise inputs.Refused(400, "purging deletes parked messages for good: confirm it (confirm=yes)", "confirm")
        chosen = _chosen(form)
        count = await store.purge_parked(chosen)
        what = "every parked message" if chosen is None else ", ".join(chosen[:20])
        return Done(f"purged {count} parked outbox message(s) ({what})", f"{PREFIX}/outbox", {"count": count})

    return [
        Route("/outbox", site.page(page), methods=["GET"]),
        Route("/outbox/show", site.page(show), methods=["GET"]),
        Route("/outbox/retry", site.action("outbox.retry", retry), methods=["POST"]),
        Route("/outbox/purge", site.action("outbox.purge", purge), methods=["POST"]),
    ]
