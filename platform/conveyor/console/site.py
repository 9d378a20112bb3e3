"""The console's request plumbing: who is asking, may they, rendering, errors and the audit log.

Every page goes through :meth:`Site.page` and every action (a POST that
changes something) through :meth:`Site.action`, so the rules of
:mod:`conveyor.console.auth` hold on every route by construction. Actions
are logged on the ``conveyor.console`` logger with who did it, from which
address, and what; refused actions are logged as warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from conveyor import errors
from conveyor.console import auth, filters, inputs
from conveyor.console.sources import Sources
from conveyor.runtime import ingest

log = logging.getLogger("conveyor.console")

PREFIX = "/console"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
_STATUS_OF = ((errors.NotFound, 404), (errors.ConcurrencyConflict, 409), (errors.ConfigurationError, 409))


@dataclass(slots=True)
class Caller:
    """Who sent a request, and how they proved it.

    Attributes:
        who: the operator's name, ``bearer`` for a bearer token, ``local`` without a token.
        via: ``bearer``, ``session`` (logged in) or ``local`` (no token configured).
        session: the browser session (None for bearer requests).
        new_session: the session was made for this request: its cookie must be set.
    """

    who: str
    via: Literal["bearer", "session", "local"]
    session: auth.Session | None = None
    new_session: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """A page to render: a template of ``templates/`` and its variables."""

    template: str
    context: Mapping[str, Any] = field(default_factory=dict)
    status: int = 200


@dataclass(frozen=True, slots=True)
class Done:
    """What an action did: a message, the page to go back to, and figures for API callers."""

    message: str
    back: str
    data: Mapping[str, Any] = field(default_factory=dict)


PageHandler = Callable[[Request, Caller], Awaitable[Page]]
ActionHandler = Callable[[Request, Caller, inputs.Form], Awaitable[Done]]
Endpoint = Callable[[Request], Awaitable[Response]]


class NotLoggedIn(Exception):
    """The request needs a login (a page) or a credential (an API call)."""


def wants_html(request: Request) -> bool:
    """Whether the caller is a browser (it accepts HTML); API callers get JSON."""
    return "text/html" in request.headers.get("accept", "")


def remote(request: Request) -> str:
    """The peer's address, for the audit log."""
    return request.client.host if request.client else "?"


class Site:
    """Shared state and plumbing of one console.

    Args:
        sources: what the console shows and acts on.
        access: who may use it.
        environment: the Jinja environment of its templates (autoescaping on).
    """

    def __init__(self, sources: Sources, access: auth.Access, environment: jinja2.Environment) -> None:
        self.sources = sources
        self.access = access
        self.env = environment
        self.sessions = auth.Sessions()
        self.logins = auth.LoginLimiter()

    # -- who is asking -------------------------------------------------------------------------

    def identify(self, request: Request) -> Caller:
        """The caller of ``request``.

        Raises:
            Refused: a wrong bearer token (401), or a host other than localhost without a token (403).
            NotLoggedIn: a token is configured and the request carries no valid credential.
        """
        if self.access.local and not auth.is_loopback(request.url.hostname or ""):
            raise inputs.Refused(403, "without CONVEYOR_CONSOLE_TOKEN the console answers only requests to localhost")
        given = auth.bearer(request)
        if given is not None:
            if self.access.token is None or not auth.token_matches(given, self.access.token):
                raise inputs.Refused(401, "wrong bearer token", code="unauthorized")
            return Caller("bearer", "bearer")
        session = self.sessions.get(request.cookies.get(auth.COOKIE))
        if self.access.local:
            if session is None or session.who is None:
                return Caller("local", "local", self.sessions.new("local"), new_session=True)
            return Caller("local", "local", session)
        if session is not None and session.who is not None:
            return Caller(session.who, "session", session)
        raise NotLoggedIn

    def can_act(self, caller: Caller) -> bool:
        """Whether ``caller`` may run actions (so the pages show them)."""
        return self.access.may_act() and (caller.via != "local" or self.access.local_actions)

    async def authorize_action(self, request: Request, caller: Caller) -> inputs.Form:
        """Check that ``caller`` may run an action now and return its form.

        Raises:
            Refused: read-only (403), no credential configured (403), cross-site or
                without the session's CSRF token (403), or an unreadable form.
        """
        if self.access.readonly:
            raise inputs.Refused(403, "the console is read-only (CONVEYOR_CONSOLE_READONLY)", code="read_only")
        if not self.can_act(caller):
            raise inputs.Refused(403, "actions need a console credential: set CONVEYOR_CONSOLE_TOKEN", code="forbidden")
        if caller.via == "bearer":
            return await inputs.read_form(request)
        if not auth.same_origin(request):
            raise inputs.Refused(403, "cross-site request refused", code="csrf")
        form = await inputs.read_form(request)
        assert caller.session is not None
        if caller.new_session or not auth.csrf_matches(inputs.one(form, "csrf", ""), caller.session):
            raise inputs.Refused(403, "missing or stale form token: reload the page and try again", code="csrf")
        return form

    # -- endpoints -----------------------------------------------------------------------------

    def page(self, handler: PageHandler) -> Endpoint:
        """A GET endpoint rendering what ``handler`` returns, for a known caller."""

        async def endpoint(request: Request) -> Response:
            caller: Caller | None = None
            try:
                caller = self.identify(request)
                response = self.render(request, caller, await handler(request, caller))
            except Exception as exc:
                response = self.failure(request, exc, caller)
            return self.finish(request, response, caller)

        return endpoint

    def action(self, name: str, handler: ActionHandler) -> Endpoint:
        """A POST endpoint running ``handler`` once the caller passed every check; audited."""

        async def endpoint(request: Request) -> Response:
            caller: Caller | None = None
            try:
                caller = self.identify(request)
                form = await self.authorize_action(request, caller)
                done = await handler(request, caller, form)
            except Exception as exc:
                level = logging.WARNING if isinstance(exc, inputs.Refused | NotLoggedIn) else logging.ERROR
                who = caller.who if caller else "unknown"
                log.log(level, "console action %s by %s from %s refused or failed: %s", name, who, remote(request), exc)
                return self.finish(request, self.failure(request, exc, caller), caller)
            log.info(
                "console action %s by %s (%s) from %s: %s", name, caller.who, caller.via, remote(request), done.message
            )
            if not wants_html(request):
                return self.finish(request, JSONResponse({"ok": True, "message": done.message, **done.data}), caller)
            if caller.session is not None:
                caller.session.flash.append(done.message)
            return self.finish(request, RedirectResponse(done.back, status_code=303), caller)

        return endpoint

    # -- responses -----------------------------------------------------------------------------

    def render(self, request: Request, caller: Caller | None, page: Page) -> Response:
        """The page as HTML, with the variables every template uses."""
        session = caller.session if caller else None
        flash = list(session.flash) if session else []
        if session:
            session.flash.clear()
        context = {
            "prefix": PREFIX,
            "service": self.sources.service,
            "caller": caller,
            "csrf": session.csrf if session else "",
            "can_act": caller is not None and self.can_act(caller),
            "readonly": self.access.readonly,
            "local": self.access.local,
            "flash": flash,
            "path": request.url.path,
            "nav": "",
            **page.context,
        }
        return HTMLResponse(self.env.get_template(page.template).render(context), status_code=page.status)

    def failure(self, request: Request, exc: Exception, caller: Caller | None) -> Response:
        """The answer to a failed request: an HTML error page for browsers, the JSON error shape otherwise."""
        if isinstance(exc, NotLoggedIn):
            if wants_html(request) and request.method == "GET":
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"{PREFIX}/login?next={quote(target, safe='')}", status_code=303)
            exc = inputs.Refused(
                401, "log in or send Authorization: Bearer <CONVEYOR_CONSOLE_TOKEN>", code="unauthorized"
            )
        if not isinstance(exc, inputs.Refused):
            exc = self._refusal(exc)
        if wants_html(request):
            page = Page("error.html", {"status": exc.status, "message": exc.message, "field": exc.field}, exc.status)
            response = self.render(request, caller, page)
        else:
            response = ingest.error_response(exc.status, exc.message, exc.field, code=exc.code)
        if exc.status == 401:
            response.headers["www-authenticate"] = "Bearer"
        return response

    @staticmethod
    def _refusal(exc: Exception) -> inputs.Refused:
        for kind, status in _STATUS_OF:
            if isinstance(exc, kind):
                return inputs.Refused(status, str(exc))
        if isinstance(exc, errors.ConveyorError):  # store or broker outage: the reason goes to the log only
            log.error("console: %s", exc)
            return inputs.Refused(503, "the database or the broker is unavailable now; try again")
        log.exception("console: internal error", exc_info=exc)
        return inputs.Refused(500, "internal error", code="internal")

    def finish(self, request: Request, response: Response, caller: Caller | None) -> Response:
        """Add the security headers, and the session cookie when the session is new."""
        response.headers.update(SECURITY_HEADERS)
        if caller is not None and caller.new_session and caller.session is not None:
            self.set_cookie(request, response, caller.session)
        return response

    @staticmethod
    def set_cookie(request: Request, response: Response, session: auth.Session) -> None:
        """Set the session cookie: HttpOnly, SameSite=Strict, Path=/console, Secure over HTTPS."""
        response.set_cookie(
            auth.COOKIE,
            session.id,
            max_age=int(auth.SESSION_SECONDS),
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def environment() -> jinja2.Environment:
    """The Jinja environment of the console's templates: autoescaping on, undefined names are errors."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("conveyor.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    filters.install(env)
    return env
