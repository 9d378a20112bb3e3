"""Who may use the console, and how a request proves it.

The rule, safe by default:

* With ``CONVEYOR_CONSOLE_TOKEN`` set, every page and action needs the token:
  as ``Authorization: Bearer <token>`` (scripts) or through the login form,
  which sets a session cookie (HttpOnly, SameSite=Strict, Path=/console,
  Secure over HTTPS). Tokens are compared with :func:`hmac.compare_digest`.
* Without a token the console is for the local machine only: it may serve
  only a process bound to a loopback address, and answers only requests whose
  ``Host`` names one (a DNS-rebinding page cannot read it). Pages can be
  viewed; actions are allowed only in ``conveyor run`` (the embedded
  development default), and refused (403) in every other process type.
* ``CONVEYOR_CONSOLE_READONLY=1`` hides every action and refuses it (403).
* An action from a browser session must carry the session's CSRF token, and
  is refused when ``Origin`` names another site or ``Sec-Fetch-Site`` says it
  is cross-site; bearer requests carry no ambient credential, so they need
  neither.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import Request

from conveyor import errors

COOKIE = "conveyor_console"
SESSION_SECONDS = 12 * 3600
"""How long a login lasts."""
MAX_SESSIONS = 1000
"""Sessions kept; the oldest is forgotten first."""
LOGIN_FAILURES = 5
"""Failed logins from one address per minute before it is refused (429) for the rest of that minute."""
_OPERATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a ``Host`` header's name) is a loopback address or ``localhost``."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Access:
    """The console's access rule in one process.

    Attributes:
        token: the console credential; None means local access only (see the module docs).
        readonly: actions are hidden and refused.
        local_actions: without a token, actions are allowed (the embedded ``conveyor run`` on loopback).
    """

    token: str | None
    readonly: bool = False
    local_actions: bool = False

    @property
    def local(self) -> bool:
        """No credential is configured: local access only."""
        return self.token is None

    def may_act(self) -> bool:
        """Whether actions exist at all in this process (before any per-request check)."""
        return not self.readonly and (self.token is not None or self.local_actions)


def access_for(*, enabled: bool | None, token: str | None, readonly: bool, host: str, embedded: bool) -> Access | None:
    """The console's access rule for a process, or None when it serves no console.

    Args:
        enabled: ``CONVEYOR_CONSOLE``; None means on in ``conveyor run`` only.
        token: ``CONVEYOR_CONSOLE_TOKEN``.
        readonly: ``CONVEYOR_CONSOLE_READONLY``.
        host: the HTTP bind address.
        embedded: the process is ``conveyor run``.

    Raises:
        ConfigurationError: the console is switched on, without a token, on an
            address other machines can reach.
    """
    wanted = embedded if enabled is None else enabled
    if not wanted:
        return None
    if token is None and not is_loopback(host):
        if enabled is None:
            return None  # on by default only where it is safe: say nothing, serve nothing
        raise errors.ConfigurationError(
            f"CONVEYOR_CONSOLE is on and the HTTP server listens on {host}, which other machines can reach: "
            "set CONVEYOR_CONSOLE_TOKEN (16 characters at least), or CONVEYOR_HTTP_HOST=127.0.0.1"
        )
    return Access(token=token, readonly=readonly, local_actions=token is None and embedded)


def operator_name(value: str) -> str:
    """The name an operator logs in under (for the audit log), or ``operator`` when blank.

    Raises:
        ValueError: not 1-64 of letters, digits, space, ``.``, ``_``, ``@``, ``-``.
    """
    value = value.strip()
    if not value:
        return "operator"
    if not _OPERATOR.match(value):
        raise ValueError("a name is 1-64 letters, digits, spaces, '.', '_', '@' or '-'")
    return value


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of a presented credential with the configured one."""
    return hmac.compare_digest(given.encode(), token.encode())


def bearer(request: Request) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` header (scheme case-insensitive), if any."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site (``Origin``, ``Sec-Fetch-Site``).

    Browsers send ``Origin`` on every POST and ``Sec-Fetch-Site`` on every
    request; a client sending neither (a script) is judged by its CSRF token.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return origin != "null" and (parts.scheme, parts.netloc) == (request.url.scheme, request.url.netloc)


@dataclass(slots=True)
class Session:
    """A browser session: its CSRF token, and who logged in (None before login).

    Attributes:
        id: the cookie's value.
        csrf: the token every form of the session carries.
        who: the operator's name once logged in (``local`` without a token), else None.
        expires: monotonic deadline.
        flash: messages to show on the next page.
    """

    id: str
    csrf: str
    who: str | None
    expires: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    """Sessions of one process, in memory (a restart logs everyone out).

    Args:
        ttl: seconds a session lasts.
        limit: sessions kept; the oldest is dropped beyond it.
    """

    def __init__(self, ttl: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._ttl = ttl
        self._limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, if any."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires < time.monotonic():
            del self._sessions[session_id]
            return None
        return session

    def new(self, who: str | None) -> Session:
        """Start a session (a fresh id and CSRF token: a login never keeps the id it came with)."""
        while len(self._sessions) >= self._limit:
            self._sessions.popitem(last=False)
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            who=who,
            expires=time.monotonic() + self._ttl,
        )
        self._sessions[session.id] = session
        return session

    def drop(self, session_id: str) -> None:
        """End a session; idempotent."""
        self._sessions.pop(session_id, None)


class LoginLimiter:
    """Counts failed logins per remote address over the last minute.

    Args:
        limit: failures allowed per address per minute.
    """

    def __init__(self, limit: int = LOGIN_FAILURES) -> None:
        self._limit = limit
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, address: str) -> bool:
        """Whether ``address`` spent its failures for this minute."""
        recent = self._failures.get(address)
        if recent is None:
            return False
        while recent and recent[0] < time.monotonic() - 60:
            recent.popleft()
        return len(recent) >= self._limit

    def failed(self, address: str) -> None:
        """Record a failed login from ``address``."""
        if len(self._failures) >= 10_000:
            self._failures.popitem(last=False)
        self._failures.setdefault(address, deque()).append(time.monotonic())


def csrf_matches(given: str, session: Session) -> bool:
    """Constant-time check of a form's CSRF token against its session's."""
    return bool(given) and hmac.compare_digest(given.encode(), session.csrf.encode())
