"""The autoscaling signal in a worker: gauges, ``GET /scaling``, and a slow broker that must not break them."""

from __future__ import annotations

import asyncio
import time

import httpx
import prometheus_client
from conveyor import envelope, on, ports, registry, status_cli
from conveyor.envelope import WireMessage
from conveyor.runtime import http, scaling
from conveyor.runtime.worker import Worker, dead_letter_topic
from conveyor.testing import unique
from conveyor.transports.memory import MemoryTransport


def sample(metric: str, handler: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(metric, {"handler": handler})


class Hanging(MemoryTransport):
    """A broker whose backlog query never answers."""

    async def backlog(self, subscription: ports.Subscription) -> ports.Backlog:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def one_handler(concurrency: int | None = 3) -> tuple[str, list[registry.Handler]]:
    topic, name = unique("scale"), unique("scale")

    @on(topic, name=name, concurrency=concurrency)
    async def handle(payload: dict) -> None:
        return None

    return name, registry.Registry.of(handle).handlers


async def get(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


async def test_refresh_sets_backlog_and_capacity_gauges() -> None:
    name, handlers = one_handler(concurrency=3)
    transport = MemoryTransport(f"memory://{unique('scale')}")
    await transport.connect()
    worker = Worker(handlers, transport, source="t")
    await worker.declare()
    reporter = scaling.ScalingReporter(transport, worker)
    await reporter.refresh()
    assert (sample("conveyor_backlog", name), sample("conveyor_capacity", name)) == (0.0, 3.0)
    await transport.close()


async def test_refresh_with_a_hanging_broker_returns_within_the_timeout_and_reports_the_error() -> None:
    name, handlers = one_handler()
    transport = Hanging(f"memory://{unique('scale')}")
    await transport.connect()
    reporter = scaling.ScalingReporter(transport, Worker(handlers, transport, source="t"), timeout=0.2)
    started = time.monotonic()
    await reporter.refresh()
    assert time.monotonic() - started < 1
    [entry] = reporter.snapshot()["handlers"]
    assert (entry["handler"], entry["backlog"], entry["error"]) == (name, None, "no answer within 0.2s")
    await transport.close()


async def test_scaling_route_serves_the_callback_body() -> None:
    body = {"handlers": [{"handler": "a.b", "capacity": 2, "backlog": 7}]}
    response = await get(http.create_app([], scaling=lambda: body), "/scaling")
    assert (response.status_code, response.json()) == (200, body)


async def test_scaling_route_without_a_worker_is_404_in_the_error_shape() -> None:
    response = await get(http.create_app([]), "/scaling")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_scaling_route_when_the_callback_fails_is_503_in_the_error_shape() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("driver text that must not leak")

    response = await get(http.create_app([], scaling=broken), "/scaling")
    assert response.status_code == 503
    assert response.json() == {
        "error": {"code": "unavailable", "message": "the scaling figures are unavailable now; try again", "field": None}
    }


async def test_status_rows_show_backlog_and_default_capacity_and_say_why_one_is_missing() -> None:
    name, handlers = one_handler(concurrency=None)
    transport = MemoryTransport(f"memory://{unique('scale')}")
    await transport.connect()
    await Worker(handlers, transport, source="t").declare()
    [row] = await status_cli.read(transport, handlers, concurrency=7)
    assert (row.cells()[0], *row.cells()[2:]) == (name, "0", "0.0s", "7")

    class Bare(MemoryTransport):
        backlog = None  # type: ignore[assignment]

    [row] = await status_cli.read(Bare(transport.url), handlers, concurrency=7)
    assert (row.backlog, row.error) == (None, "this broker reports no backlog")
    await transport.close()


async def test_refresh_sets_the_dead_letter_gauge_of_each_topic_from_its_keeper() -> None:
    _, handlers = one_handler()
    topic = handlers[0].topic
    transport = MemoryTransport(f"memory://{unique('scale')}")
    await transport.connect()
    worker = Worker(handlers, transport, source="t")
    await worker.declare()  # the keeper of topic.dlq too
    for _ in range(2):
        await transport.publish(dead_letter_topic(topic), WireMessage(b"{}", {}, None, envelope.new_id()))
    await scaling.ScalingReporter(transport, worker).refresh()
    assert prometheus_client.REGISTRY.get_sample_value("conveyor_dead_letters", {"topic": topic}) == 2.0
    await transport.close()
