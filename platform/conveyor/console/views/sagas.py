"""Sagas: instances filtered by saga and status; an instance's timeline; retry a parked one, abort one.

Retry and abort write an operator signal through the outbox, as ``conveyor
sagas retry|abort`` do (the relay must run, as it does in ``conveyor run``);
the saga's handler applies it in order with the instance's replies.
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.routing import Route

from conveyor import attributes, errors
from conveyor.console import inputs
from conveyor.console.site import PREFIX, Caller, Done, Page, Site
from conveyor.sagas import engine

MAX_LISTED = 500
"""Most instances listed."""
STATUSES = [status.value for status in engine.Status]
_KINDS = {
    "sent": "command", "replied": "reply", "undo sent": "compensation", "undone": "compensation",
    "undo failed": "error", "compensating": "compensation", "compensated": "compensation",
    "failed": "error", "timed out": "error", "parked": "error", "completed": "done", "retried": "operator",
    "undo re-sent": "compensation", "dead-lettered": "error", "undo dead-lettered": "error",
}  # fmt: skip


def kind(event: str) -> str:
    """The timeline class of a step-log event: command, reply, compensation, error, done, operator or state."""
    return _KINDS.get(event, "state")


def _instance_id(value: str) -> str:
    try:
        return attributes.check_id(value, "id")
    except errors.InvalidMessage as exc:
        raise inputs.Refused(400, str(exc), "id") from None


def routes(site: Site) -> list[Route]:
    """The saga pages and actions."""
    stores = site.sources.stores

    def saga_name(value: str) -> str:
        return inputs.known("saga", value, "saga", [s.name for s in site.sources.app.sagas])

    async def page(request: Request, caller: Caller) -> Page:
        query = request.query_params
        saga = query.get("saga") or None
        if saga is not None:
            inputs.name("saga", saga, "saga")
        status = inputs.choice(query.get("status"), "status", STATUSES)
        limit = inputs.count(query.get("limit"), "limit", default=100, low=1, high=MAX_LISTED)
        async with stores.database.transaction(readonly=True) as tx:
            records = await stores.sagas.find(tx, saga=saga, status=status, limit=limit + 1)
            counts = await stores.sagas.counts(tx)
        context = {
            "nav": "sagas", "records": records[:limit], "more": len(records) > limit, "saga": saga or "",
            "status": status or "", "limit": limit,
            "statuses": STATUSES, "names": sorted({s.name for s in site.sources.app.sagas} | {k[0] for k in counts}),
            "counts": counts,
        }  # fmt: skip
        return Page("sagas.html", context)

    async def show(request: Request, caller: Caller) -> Page:
        saga = inputs.name("saga", request.query_params.get("saga", ""), "saga")
        instance = _instance_id(request.query_params.get("id", ""))
        async with stores.database.transaction(readonly=True) as tx:
            record = await stores.sagas.load(tx, saga, instance)
            if record is None:
                raise inputs.Refused(404, f"no instance {instance!r} of saga {saga!r}", "id")
            history = await stores.sagas.history(tx, saga, instance)
        timeline = [(line, kind(line.entry.event)) for line in history]
        return Page("saga.html", {"nav": "sagas", "record": record, "timeline": timeline})

    def signal(action: str) -> Route:
        async def act(request: Request, caller: Caller, form: inputs.Form) -> Done:
            from conveyor import sagas_cli  # the operator signal's one implementation (imported late: it loads the CLI)

            saga = saga_name(inputs.one(form, "saga"))
            instance = _instance_id(inputs.one(form, "id"))
            await sagas_cli.request(stores, instance, saga, action, site.sources.service)
            back = f"{PREFIX}/sagas/show?{urlencode({'saga': saga, 'id': instance})}"
            return Done(f"saga {saga} {instance}: {action} sent", back, {"saga": saga, "id": instance})

        return Route(f"/sagas/{action}", site.action(f"sagas.{action}", act), methods=["POST"])

    return [
        Route("/sagas", site.page(page), methods=["GET"]),
        Route("/sagas/show", site.page(show), methods=["GET"]),
        signal("retry"),
        signal("abort"),
    ]
