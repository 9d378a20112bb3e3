"""HTTP ingest over the real outbox: idempotent by event id, data stored byte for byte."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conveyor import envelope
from conveyor.runtime import app, http
from conveyor.settings import Settings

from event_store import Database, Outbox, models

EVENT = {"specversion": "1.0", "id": "e-1", "source": "shop", "type": "orders.placed", "data": {"order_id": "o-1"}}
STRUCTURED = {"content-type": "application/cloudevents+json"}
BINARY = {"content-type": "application/json", "ce-specversion": "1.0", "ce-source": "shop", "ce-type": "t"}


@pytest.fixture
async def client(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    ingest = app._ingest(Settings(service="shop"), app.stores_for(db, "shop"))
    transport = httpx.ASGITransport(app=http.create_app([], ingest))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def outbox_rows(db: Database) -> list[Any]:
    async with db.transaction(readonly=True) as session:
        return list((await session.execute(sa.select(models.outbox))).all())


async def post(client: httpx.AsyncClient, topic: str = "orders.placed", **changes: object) -> httpx.Response:
    return await client.post(f"/events/{topic}", content=orjson.dumps({**EVENT, **changes}), headers=STRUCTURED)


async def test_ingest_same_event_twice_answers_202_twice(client: httpx.AsyncClient) -> None:
    first, second = await post(client), await post(client)
    assert [first.status_code, second.status_code] == [202, 202]


async def test_ingest_same_event_twice_stores_one_row(client: httpx.AsyncClient, db: Database) -> None:
    await post(client)
    await post(client)
    assert len(await outbox_rows(db)) == 1


async def test_ingest_same_id_for_another_topic_is_409_naming_id(client: httpx.AsyncClient) -> None:
    await post(client)
    response = await post(client, topic="orders.shipped")
    assert (response.status_code, response.json()["error"]["field"]) == (409, "id")


async def test_ingest_idempotency_key_retry_stores_one_row(client: httpx.AsyncClient, db: Database) -> None:
    headers = {**BINARY, "idempotency-key": "k-1"}
    for _ in range(2):
        await client.post("/events/orders.placed", content=b'{"a": 1}', headers=headers)
    assert [row.message_id for row in await outbox_rows(db)] == ["k-1"]


async def test_ingest_structured_30_digit_integer_is_stored_exactly(client: httpx.AsyncClient, db: Database) -> None:
    body = b'{"specversion":"1.0","id":"e-9","source":"shop","type":"t","data":{"n": 123456789012345678901234567890}}'
    await client.post("/events/orders.placed", content=body, headers=STRUCTURED)
    assert (await outbox_rows(db))[0].body == b'{"n": 123456789012345678901234567890}'


def event(source: str = "shop") -> envelope.Envelope:
    return envelope.Envelope(id="e-1", source=source, type="t", data=b"{}")


async def add_once(db: Database, topic: str, message: envelope.Envelope) -> str:
    async with db.transaction() as session:
        return await Outbox().add_once(session, topic, message)


async def test_add_once_new_event_is_added(db: Database) -> None:
    assert await add_once(db, "orders.placed", event()) == "added"


async def test_add_once_same_event_again_is_duplicate(db: Database) -> None:
    await add_once(db, "orders.placed", event())
    assert await add_once(db, "orders.placed", event()) == "duplicate"


async def test_add_once_same_id_for_another_topic_is_conflict(db: Database) -> None:
    await add_once(db, "orders.placed", event())
    assert await add_once(db, "orders.shipped", event()) == "conflict"


async def test_add_once_same_id_from_another_source_is_conflict(db: Database) -> None:
    await add_once(db, "orders.placed", event())
    assert await add_once(db, "orders.placed", event(source="billing")) == "conflict"


async def test_add_once_duplicate_leaves_the_first_row(db: Database) -> None:
    await add_once(db, "orders.placed", event())
    await add_once(db, "orders.placed", event().evolve(data=b'{"changed": true}'))
    assert [row.body for row in await outbox_rows(db)] == [b"{}"]
