"""The HTTP contract other services rely on: /version, one error shape everywhere, X-Request-Id."""

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from conveyor.runtime import http
from test_http import EVENT, STRUCTURED, Accepted, client_for

VERSION = {"version": "1.2.3", "git_sha": "abc123", "broker": "nats", "database": "postgresql"}


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, Accepted]]:
    accepted = Accepted()
    app = http.create_app([], http.IngestConfig(accept=accepted, max_bytes=4096), VERSION)
    async with await client_for(app) as c:
        yield c, accepted


async def test_version_names_the_package_commit_and_backends(client: tuple[httpx.AsyncClient, Accepted]) -> None:
    response = await client[0].get("/version")
    assert (response.status_code, response.json()) == (200, VERSION)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("DELETE", "/events/orders.placed", 405, "method_not_allowed")],
)
async def test_every_error_has_the_one_json_shape(
    client: tuple[httpx.AsyncClient, Accepted], method: str, path: str, status: int, code: str
) -> None:
    response = await client[0].request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code and set(response.json()["error"]) == {"code", "message", "field"}


async def test_an_ingest_error_names_code_message_and_field(client: tuple[httpx.AsyncClient, Accepted]) -> None:
    response = await client[0].post("/events/Bad%20Topic", content=orjson.dumps(EVENT), headers=STRUCTURED)
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["field"]) == (400, "invalid_event", "topic")
    assert "invalid topic" in error["message"]


async def test_a_request_id_becomes_the_correlation_id_and_is_echoed(
    client: tuple[httpx.AsyncClient, Accepted],
) -> None:
    c, accepted = client
    response = await c.post(
        "/events/orders.placed", content=orjson.dumps(EVENT), headers={**STRUCTURED, "x-request-id": "req-42"}
    )
    assert (response.status_code, response.headers["x-request-id"]) == (202, "req-42")
    assert accepted.events[0][1].correlationid == "req-42"


async def test_without_a_request_id_one_is_generated_and_echoed(client: tuple[httpx.AsyncClient, Accepted]) -> None:
    c, accepted = client
    response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    generated = response.headers["x-request-id"]
    assert len(generated) == 36 and accepted.events[0][1].correlationid == generated


async def test_an_events_own_correlation_id_wins_over_the_request_id(
    client: tuple[httpx.AsyncClient, Accepted],
) -> None:
    c, accepted = client
    event = {**EVENT, "correlationid": "flow-7"}
    response = await c.post(
        "/events/orders.placed", content=orjson.dumps(event), headers={**STRUCTURED, "x-request-id": "r"}
    )
    assert response.status_code == 202 and accepted.events[0][1].correlationid == "flow-7"


@pytest.mark.parametrize("bad", ["x" * 201, "caf\u00e9"])
async def test_an_unprintable_or_long_request_id_is_400(client: tuple[httpx.AsyncClient, Accepted], bad: str) -> None:
    response = await client[0].post(
        "/events/orders.placed",
        content=orjson.dumps(EVENT),
        headers={**STRUCTURED, "x-request-id": bad.encode("utf-8")},
    )
    assert (response.status_code, response.json()["error"]["field"]) == (400, "X-Request-Id")
    assert response.headers["x-request-id"] == "invalid"


async def test_stop_does_not_wait_forever_for_a_client_that_never_sends_its_body() -> None:
    accepted = Accepted()
    server = http.HttpServer(
        http.create_app([], http.IngestConfig(accept=accepted, max_bytes=4096)), "127.0.0.1", 0, 0.5
    )
    await server.start()
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /events/orders.placed HTTP/1.1\r\nHost: x\r\nContent-Type: application/cloudevents+json\r\n"
                 b"Content-Length: 500\r\n\r\n{\"specversion\"")  # fmt: skip
    await writer.drain()
    await asyncio.sleep(0.2)  # the request is under way, its body never completes
    started = time.monotonic()
    await asyncio.wait_for(server.stop(), 10)
    assert time.monotonic() - started < 5
    writer.close()
    assert accepted.events == []


async def test_an_unexpected_failure_answers_500_in_the_one_json_shape() -> None:
    async def broken(topic: str, event: object) -> http.Outcome:
        raise RuntimeError("a bug, not an outage")

    app = http.create_app([], http.IngestConfig(accept=broken, max_bytes=4096), VERSION)
    # raise_app_exceptions=False: the ASGI server gets the exception (and logs it) after the response is sent
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        response = await c.post("/events/orders.placed", content=orjson.dumps(EVENT), headers=STRUCTURED)
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal", "message": "internal error", "field": None}}
