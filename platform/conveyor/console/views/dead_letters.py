"""Dead letters: per topic, the list, one letter's headers and body; replay or purge.

Browsing never consumes or alters a dead letter: it uses
:func:`conveyor.runtime.dead_letters.peek` on a connection of its own,
closed afterwards, which gives the broker back every letter it took. Replay
and purge act only on the letters the form names (by id, or every one), and
only on letters that failed on the topic the form names: a letter whose
headers name another topic is left where it is. One dead-letter operation
runs at a time per process, so two viewers never split a topic's letters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
from starlette.requests import Request
from starlette.routing import Route

from conveyor import ports
from conveyor.console import inputs
from conveyor.console.site import PREFIX, Caller, Done, Page, Site
from conveyor.console.sources import Sources
from conveyor.runtime import dead_letters

log = logging.getLogger("conveyor.console")

T = TypeVar("T")
MAX_LISTED = 200
"""Most letters listed."""
MAX_AT_ONCE = 10_000
"""Most letters one replay or purge acts on."""


def letter_id(letter: dead_letters.DeadLetter) -> str:
    """What names a dead letter in the console: ``held-<row>`` for held ones, else its broker message id."""
    if letter.held_id is not None:
        return f"held-{letter.held_id}"
    return letter.message.message_id or letter.event_id or ""


def pretty(body: bytes) -> str:
    """A body as indented JSON, or as text when it is not JSON."""
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


async def waiting(sources: Sources) -> dict[str, int | None]:
    """Dead letters waiting per topic, from the keepers' backlogs (None where the broker cannot tell)."""
    topics = sources.dead_letter_topics()
    if sources.transport is None:
        return dict.fromkeys(topics)
    return await dead_letters.waiting(sources.transport, topics)


class Letters:
    """Dead-letter operations on connections of their own, one at a time."""

    def __init__(self, site: Site) -> None:
        self._site = site
        self._lock = asyncio.Lock()

    async def _on_own_connection(self, operation: Callable[[ports.Transport, float], Awaitable[T]]) -> T:
        async with self._lock:
            transport = self._site.sources.open_transport()
            await transport.connect()
            try:
                # An in-process broker hands letters over at once; a remote one needs a moment.
                idle = 1.5 if transport.features.durable else 0.25
                return await operation(transport, idle)
            finally:
                await transport.close()

    async def peek(
        self, topic: str, limit: int, select: dead_letters.Select | None = None
    ) -> list[dead_letters.DeadLetter]:
        """Up to ``limit`` letters of ``topic`` (those ``select`` accepts), left in place."""
        held = self._site.sources.stores.dead_letters
        return await self._on_own_connection(
            lambda t, idle: dead_letters.peek(t, topic, limit=limit, idle=idle, held=held, select=select)
        )

    async def act(
        self, verb: str, topic: str, chosen: list[str] | None, among: dead_letters.Select | None = None
    ) -> list[dead_letters.DeadLetter]:
        """Replay or purge the letters of ``topic`` named by ``chosen`` (None: every one ``among`` accepts)."""
        wanted = None if chosen is None else set(chosen)

        def select(letter: dead_letters.DeadLetter) -> bool:
            if letter.topic != topic:
                return False
            return letter_id(letter) in wanted if wanted is not None else among is None or among(letter)

        limit = MAX_AT_ONCE if wanted is None else len(wanted)
        held = self._site.sources.stores.dead_letters
        run = dead_letters.replay if verb == "replay" else dead_letters.purge
        return await self._on_own_connection(
            lambda t, idle: run(t, topic, limit=limit, idle=idle, held=held, select=select)
        )


def _topic(site: Site, request: Request) -> str:
    return inputs.known("topic", request.path_params["topic"], "topic", site.sources.dead_letter_topics())


FILTERS = ("handler", "error_type", "event_id")
"""The fields that filter a topic's letters (query parameters of its page, fields of its forms)."""


def _filters(form: inputs.Form) -> dict[str, str]:
    """The filter fields given (empty ones left out), each a valid id."""
    given = {field: inputs.one(form, field, "").strip() for field in FILTERS}
    return {field: inputs.ident(value, field) for field, value in given.items() if value}


def _matching(filters: dict[str, str]) -> dead_letters.Select | None:
    return dead_letters.matching(**filters) if filters else None


def _chosen(form: inputs.Form) -> list[str] | None:
    if inputs.one(form, "all", "") == "yes":
        if form.get("id"):
            raise inputs.Refused(400, "choose letters or every letter, not both", "all")
        return None
    return inputs.ids(form, "id", MAX_LISTED)


def routes(site: Site) -> list[Route]:
    """The dead-letter pages and actions."""
    letters = Letters(site)

    async def index(request: Request, caller: Caller) -> Page:
        return Page("dead_letters.html", {"nav": "dead", "waiting": await waiting(site.sources)})

    async def topic_page(request: Request, caller: Caller) -> Page:
        topic = _topic(site, request)
        query = {k: request.query_params.getlist(k) for k in request.query_params}
        limit = inputs.count(request.query_params.get("limit"), "limit", default=50, low=1, high=MAX_LISTED)
        filters = _filters(query)
        found = await letters.peek(topic, limit, _matching(filters))
        rows = [(letter_id(letter), letter) for letter in found]
        handlers = sorted(h.name for h in site.sources.app.handlers if h.topic == topic)
        context = {
            "nav": "dead", "topic": topic, "rows": rows, "limit": limit, "filters": filters, "handlers": handlers,
        }  # fmt: skip
        return Page("dead_letter_topic.html", context)

    async def show(request: Request, caller: Caller) -> Page:
        topic = _topic(site, request)
        wanted = inputs.ident(request.query_params.get("id", ""), "id")
        found = await letters.peek(topic, 1, lambda letter: letter_id(letter) == wanted)
        letter = found[0] if found else None
        if letter is None:
            raise inputs.Refused(404, f"no dead letter {wanted!r} among the dead letters of {topic}", "id")
        context = {
            "nav": "dead", "topic": topic, "id": wanted, "letter": letter,
            "headers": sorted(letter.message.headers.items()), "body": pretty(letter.message.body),
        }  # fmt: skip
        return Page("dead_letter.html", context)

    async def confirm_purge(request: Request, caller: Caller) -> Page:
        topic = _topic(site, request)
        if not site.can_act(caller):
            raise inputs.Refused(403, "actions are not available to you here", code="forbidden")
        query = {k: request.query_params.getlist(k) for k in request.query_params}
        chosen, filters = _chosen(query), _filters(query)
        return Page("confirm_purge.html", {"nav": "dead", "topic": topic, "chosen": chosen, "filters": filters})

    async def replay(request: Request, caller: Caller, form: inputs.Form) -> Done:
        topic = _topic(site, request)
        done = await letters.act("replay", topic, _chosen(form), _matching(_filters(form)))
        ids = [letter_id(letter) for letter in done]
        message = f"replayed {len(done)} dead letter(s) of {topic}: {', '.join(ids[:20])}"
        return Done(message, f"{PREFIX}/dead-letters/{topic}", {"replayed": ids})

    async def purge(request: Request, caller: Caller, form: inputs.Form) -> Done:
        topic = _topic(site, request)
        if inputs.one(form, "confirm", "") != "yes":
            raise inputs.Refused(400, "purging deletes dead letters for good: confirm it (confirm=yes)", "confirm")
        done = await letters.act("purge", topic, _chosen(form), _matching(_filters(form)))
        ids = [letter_id(letter) for letter in done]
        message = f"purged {len(done)} dead letter(s) of {topic}: {', '.join(ids[:20])}"
        return Done(message, f"{PREFIX}/dead-letters/{topic}", {"purged": ids})

    return [
        Route("/dead-letters", site.page(index), methods=["GET"]),
        Route("/dead-letters/{topic}", site.page(topic_page), methods=["GET"]),
        Route("/dead-letters/{topic}/show", site.page(show), methods=["GET"]),
        Route("/dead-letters/{topic}/purge", site.page(confirm_purge), methods=["GET"]),
        Route("/dead-letters/{topic}/purge", site.action("dead-letters.purge", purge), methods=["POST"]),
        Route("/dead-letters/{topic}/replay", site.action("dead-letters.replay", replay), methods=["POST"]),
    ]
