"""HTTP endpoints: health, readiness, metrics and CloudEvents ingest (202/400/401/413/415)."""

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from conveyor import envelope, errors
from conveyor.runtime import http

EVENT = {"specversion": "1.0", "id": "e-1", "source": "shop", "type": "orders.placed", "data": {"order_id": "o-1"}}
STRUCTURED = {"content-type": "application/cloudevents+json"}
BINARY = {
    "content-type": "application/json",
    "ce-specversion": "1.0",
    "ce-id": "e-2",
    "ce-source": "shop",
    "ce-type": "t",
}


class Accepted:
    def __init__(self) -> None:
        self.events: list[tuple[str, envelope.Envelope]] = []

    async def __call__(self, topic: str, event: envelope.Envelope) -> None:
        self.events.append((topic, event))


@pytest.fixture
def accepted() -> Accepted:
    return Accepted()


async def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]


@pytest.fixture
async def client(accepted: Accepted) -> AsyncIterator[httpx.AsyncClient]:
    app = http.create_app([], http.IngestConfig(accept=accepted, max_bytes=4096, token="s3cret"))
    async with await client_for(app) as c:
        c.headers["authorization"] = "Bearer s3cret"
        yield c


async def test_structured_event_is_accepted_with_202(client: httpx.AsyncClient, accepted: Accepted) -> None:
    response = await client.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert (response.status_code, response.json()) == (202, {"id": "e-1", "topic": "orders.placed"})
    assert accepted.events[0][1].json() == {"order_id": "o-1"}


async def test_binary_event_is_accepted_and_percent_decoded(client: httpx.AsyncClient, accepted: Accepted) -> None:
    headers = {**BINARY, "ce-subject": "order%20o-1"}
    response = await client.post("/events/orders.placed", content=b'{"order_id": "o-2"}', headers=headers)
    assert response.status_code == 202
    assert accepted.events[0][1].subject == "order o-1"


async def test_missing_attribute_is_400_naming_the_field(client: httpx.AsyncClient, accepted: Accepted) -> None:
    event = {k: v for k, v in EVENT.items() if k != "source"}
    response = await client.post("/events/orders.placed", content=orjson.dumps(event), headers=STRUCTURED)
    assert (response.status_code, response.json()["field"]) == (400, "source")
    assert accepted.events == []


async def test_malformed_json_data_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.placed", content=b'{"order_id": ', headers=BINARY)
    assert (response.status_code, response.json()["field"]) == (400, "data")


async def test_invalid_topic_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.*", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert (response.status_code, response.json()["field"]) == (400, "topic")


async def test_missing_token_is_401(client: httpx.AsyncClient, accepted: Accepted) -> None:
    response = await client.post(
        "/events/orders.placed", content=orjson.dumps(EVENT), headers={**STRUCTURED, "authorization": "Bearer nope"}
    )
    assert (response.status_code, response.headers["www-authenticate"]) == (401, "Bearer")
    assert accepted.events == []


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    event = {**EVENT, "data": {"blob": "x" * 5000}}
    response = await client.post("/events/orders.placed", content=orjson.dumps(event), headers=STRUCTURED)
    assert response.status_code == 413


async def test_oversized_streamed_body_without_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    response = await client.post("/events/orders.placed", content=chunks(), headers=STRUCTURED)
    assert response.status_code == 413


async def test_other_media_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/events/orders.placed", content=b"<order/>", headers={"content-type": "text/xml"})
    assert response.status_code == 415


async def test_accept_failure_is_503() -> None:
    async def refuse(topic: str, event: envelope.Envelope) -> None:
        raise errors.TransportError("broker down")

    app = http.create_app([], http.IngestConfig(accept=refuse, max_bytes=4096))
    async with await client_for(app) as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert response.status_code == 503


async def test_readyz_reports_each_check() -> None:
    async def ok() -> None: ...

    async def down() -> None:
        raise errors.TransportError("connection refused")

    async with await client_for(
        http.create_app([http.Check("broker", ok), http.Check("cache", down, critical=False)])
    ) as c:
        degraded = await c.get("/readyz")
    async with await client_for(http.create_app([http.Check("broker", down)])) as c:
        unhealthy = await c.get("/readyz")
    assert (degraded.status_code, degraded.json()["status"]) == (200, "degraded")
    assert (unhealthy.status_code, unhealthy.json()["status"]) == (503, "unhealthy")
    assert unhealthy.json()["checks"]["broker"]["error"] == "connection refused"


async def test_healthz_and_metrics() -> None:
    async with await client_for(http.create_app([])) as c:
        health, metrics = await c.get("/healthz"), await c.get("/metrics")
    assert health.json() == {"status": "ok"}
    assert b"conveyor_messages_total" in metrics.content or b"conveyor_handler_seconds" in metrics.content


async def test_ingest_is_absent_when_disabled() -> None:
    async with await client_for(http.create_app([])) as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert response.status_code == 404
