"""Console fixtures: a console over a fresh SQLite database and an in-process broker of its own.

``make_console(...)`` builds one with a given access rule; ``client_for``
talks to it through ASGI (``http://127.0.0.1`` by default: a host the
token-less console answers). ``dead_letter(...)`` puts a dead letter where a
worker would have, in the keeper subscription of ``orders.placed``.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import databases
import httpx
import pytest
from conveyor import Context, envelope, every, on, persistence, ports, registry, transports
from conveyor.console import app as console_app
from conveyor.console import auth, samples, sources
from conveyor.runtime import app as runtime_app
from conveyor.runtime import http
from conveyor.runtime.worker import dead_letter_headers, dead_letter_topic

from event_store.database import Database

sys.path.insert(0, str(Path(__file__).parent))

TOKEN = "correct-horse-battery-staple"
TOPIC = "orders.placed"


@on(TOPIC, name="billing.charge-order")
async def charge(order: dict[str, Any], ctx: Context) -> None:
    """A handler, so the console has a topic and a handler to show."""


@every(timedelta(minutes=5), name="reports.refresh")
async def refresh(ctx: Context) -> None:
    """A schedule to pause, resume and trigger."""


@pytest.fixture
def db_path() -> Iterator[str]:
    url = databases.create("sqlite")
    yield url
    databases.drop(url)


@pytest.fixture
async def stores(db_path: str) -> AsyncIterator[persistence.Persistence]:
    database = Database(db_path)
    try:
        yield runtime_app.stores_for(database, "console-test")
    finally:
        await database.close()


@pytest.fixture
async def broker_url() -> str:
    url = f"memory://console-{uuid.uuid4().hex[:8]}"
    transport = transports.create(url)
    await transport.connect()
    kept = dead_letter_topic(TOPIC)
    await transport.declare([TOPIC, kept], [ports.Subscription(name=kept, topic=kept, max_deliveries=None)])
    await transport.close()
    return url


MakeConsole = Callable[..., Awaitable[console_app.Console]]


@pytest.fixture
async def make_console(stores: persistence.Persistence, broker_url: str) -> AsyncIterator[MakeConsole]:
    async with contextlib.AsyncExitStack() as stack:
        transport = transports.create(broker_url)
        await transport.connect()
        stack.push_async_callback(transport.close)

        async def make(**access: Any) -> console_app.Console:
            outbox = stores.relay_store()
            stack.push_async_callback(outbox.close)
            found = sources.Sources(
                service="console-test", app=registry.Registry.of(charge, refresh), stores=stores, outbox=outbox,
                open_transport=lambda: transports.create(broker_url), transport=transport,
            )  # fmt: skip
            sampler = samples.Sampler()
            sampler.sample()
            return console_app.Console(found, auth.Access(**{"token": None, **access}), sampler)

        yield make


def client_for(board: console_app.Console, base_url: str = "http://127.0.0.1") -> httpx.AsyncClient:
    """An HTTP client of the process's app with the console mounted (browser-like: it accepts HTML)."""
    site = http.create_app([], console=board.routes())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=site), base_url=base_url)
    client.headers["accept"] = "text/html"
    return client


async def dead_letter(broker_url: str, body: bytes | None = None, error: str = "boom", topic: str = TOPIC) -> str:
    """Put a dead letter of ``orders.placed`` on the broker as a worker would; return its broker id.

    ``body`` None: a CloudEvent (structured mode); else that raw body. ``topic`` is the topic
    its headers say it failed on.
    """
    message_id = envelope.new_id()
    event = envelope.create(TOPIC, {"order_id": "o-1"}, source="shop")
    wire = envelope.to_structured(event) if body is None else envelope.WireMessage(body, {})
    headers = {**wire.headers, **dead_letter_headers("billing.charge-order", topic, "ValueError", error, 5)}
    transport = transports.create(broker_url)
    await transport.connect()
    await transport.publish(dead_letter_topic(TOPIC), envelope.WireMessage(wire.body, headers, None, message_id))
    await transport.close()
    return message_id


def csrf_of(page: str) -> str:
    """The CSRF token of the first form on a page."""
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]
