"""The console's routes under ``/console``: pages, actions, login and logout, static files.

:class:`Console` is built by the process assembly (:mod:`conveyor.runtime.app`)
from ports (:class:`~conveyor.console.sources.Sources`) and the access rule
(:func:`conveyor.console.auth.access_for`); its :meth:`Console.routes` go to
:func:`conveyor.runtime.http.create_app`, and :meth:`Console.run` samples the
handlers' figures in the background.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from conveyor.console import auth, inputs, samples
from conveyor.console.site import PREFIX, Caller, Page, Site, environment, remote
from conveyor.console.sources import Sources
from conveyor.console.views import dead_letters, outbox, overview, sagas, schedules, workers

log = logging.getLogger("conveyor.console")
STATIC = Path(__file__).parent / "static"


def safe_next(value: str | None) -> str:
    """Where to go after login: a console path only (never another site)."""
    if value and value.startswith(PREFIX + "/") and "//" not in value and "\\" not in value and value.isprintable():
        return value
    return PREFIX + "/"


class Console:
    """The operations console of one process.

    Args:
        sources: what it shows and acts on.
        access: who may use it (see :mod:`conveyor.console.auth`).
        sampler: the handlers' recent figures (a new one by default).
    """

    def __init__(self, sources: Sources, access: auth.Access, sampler: samples.Sampler | None = None) -> None:
        self.site = Site(sources, access, environment())
        self.sampler = sampler or samples.Sampler()

    async def run(self, stop: asyncio.Event) -> None:
        """Sample the handlers' figures until ``stop`` is set."""
        await self.sampler.run(stop)

    def routes(self) -> list[BaseRoute]:
        """The ``/console`` mount."""
        site = self.site
        inner: list[BaseRoute] = [
            *overview.routes(site, self.sampler),
            *dead_letters.routes(site),
            *outbox.routes(site),
            *schedules.routes(site),
            *sagas.routes(site),
            *workers.routes(site),
            Route("/login", self._login_page, methods=["GET"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._logout, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
            Route("/{rest:path}", site.page(self._not_found), methods=["GET"]),
        ]
        return [Mount(PREFIX, routes=inner)]

    async def _not_found(self, request: Request, caller: Caller) -> Page:
        raise inputs.Refused(404, f"no console page {request.url.path}", code="not_found")

    async def _login_page(self, request: Request) -> Response:
        site = self.site
        target = safe_next(request.query_params.get("next"))
        if site.access.local:
            return site.finish(request, RedirectResponse(target, status_code=303), None)
        session = site.sessions.get(request.cookies.get(auth.COOKIE))
        if session is not None and session.who is not None:
            return site.finish(request, RedirectResponse(target, status_code=303), None)
        caller = None
        if session is None:
            caller = Caller("anonymous", "session", site.sessions.new(None), new_session=True)
        else:
            caller = Caller("anonymous", "session", session)
        page = Page("login.html", {"next": target, "error": None, "nav": "login"})
        return site.finish(request, site.render(request, caller, page), caller)

    async def _login(self, request: Request) -> Response:
        site = self.site
        address = remote(request)
        session = site.sessions.get(request.cookies.get(auth.COOKIE))
        caller = None if session is None else Caller("anonymous", "session", session)
        try:
            if site.access.local:
                raise inputs.Refused(404, "no token is configured: there is nothing to log in to")
            if site.logins.blocked(address):
                raise inputs.Refused(
                    429, "too many failed logins from this address: wait a minute", code="rate_limited"
                )
            if not auth.same_origin(request):
                raise inputs.Refused(403, "cross-site request refused", code="csrf")
            form = await inputs.read_form(request)
            if session is None or not auth.csrf_matches(inputs.one(form, "csrf", ""), session):
                raise inputs.Refused(403, "missing or stale form token: reload the page and try again", code="csrf")
            target = safe_next(inputs.one(form, "next", ""))
            try:
                who = auth.operator_name(inputs.one(form, "name", ""))
            except ValueError as exc:
                raise inputs.Refused(400, str(exc), "name") from None
            assert site.access.token is not None
            if not auth.token_matches(inputs.one(form, "token", ""), site.access.token):
                site.logins.failed(address)
                log.warning("console login refused from %s: wrong token", address)
                page = Page("login.html", {"next": target, "error": "wrong token", "nav": "login"}, 401)
                return site.finish(request, site.render(request, caller, page), caller)
        except inputs.Refused as exc:
            log.warning("console login refused from %s: %s", address, exc.message)
            return site.finish(request, site.failure(request, exc, caller), caller)
        site.sessions.drop(session.id)
        fresh = site.sessions.new(who)
        log.info("console login by %s from %s", who, address)
        response = RedirectResponse(target, status_code=303)
        site.set_cookie(request, response, fresh)
        return site.finish(request, response, None)

    async def _logout(self, request: Request) -> Response:
        site = self.site
        caller: Caller | None = None
        try:
            caller = site.identify(request)
            if caller.via == "session" and caller.session is not None:
                if not auth.same_origin(request):
                    raise inputs.Refused(403, "cross-site request refused", code="csrf")
                form = await inputs.read_form(request)
                if not auth.csrf_matches(inputs.one(form, "csrf", ""), caller.session):
                    raise inputs.Refused(403, "missing or stale form token: reload the page", code="csrf")
                site.sessions.drop(caller.session.id)
                log.info("console logout by %s from %s", caller.who, remote(request))
        except Exception as exc:
            return site.finish(request, site.failure(request, exc, caller), caller)
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(auth.COOKIE, path=PREFIX)
        return site.finish(request, response, None)
