"""The autoscaling signal on every broker: a subscription's backlog, as the broker reports it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import prometheus_client
from conveyor import envelope, on, ports, registry
from conveyor.runtime import http, scaling
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.transports.rabbit import RabbitTransport

Open = Callable[[], Awaitable[ports.Transport]]
N = 5


async def backlog_until(
    transport: ports.Transport, subscription: ports.Subscription, done: Callable[[ports.Backlog], bool], what: str
) -> ports.Backlog:
    """Poll the broker's backlog until ``done`` (brokers report counts eventually), within 20 s."""
    deadline = time.monotonic() + 20
    while True:
        backlog = await ports.backlog_of(transport, subscription)
        assert backlog is not None, "every shipped transport reports a backlog"
        if done(backlog):
            return backlog
        assert time.monotonic() < deadline, f"backlog still {backlog} waiting for {what}"
        await asyncio.sleep(0.2)


async def publish(transport: ports.Transport, topic: str, count: int) -> None:
    for n in range(count):
        event = envelope.create(topic, {"n": n}, source="t")
        await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))


async def test_backlog_of_unconsumed_subscription_counts_published_messages(open_transport: Open) -> None:
    topic = unique("bl")
    subscription = ports.Subscription(name=unique("bl"), topic=topic)
    transport = await open_transport()
    await transport.declare([topic], [subscription])
    await publish(transport, topic, N)
    backlog = await backlog_until(transport, subscription, lambda b: b.pending == N, f"{N} pending")
    # RabbitMQ tells no ages over AMQP; the others know when the oldest message arrived.
    assert backlog.oldest_age_s is None if isinstance(transport, RabbitTransport) else 0 <= backlog.oldest_age_s < 60


async def test_backlog_when_every_message_is_acked_drains_to_zero(open_transport: Open) -> None:
    topic = unique("bl")
    subscription = ports.Subscription(name=unique("bl"), topic=topic)
    transport = await open_transport()
    await transport.declare([topic], [subscription])
    await publish(transport, topic, N)
    await backlog_until(transport, subscription, lambda b: b.pending == N, f"{N} pending")
    acked: list[int] = []

    async def ack(delivery: ports.Delivery) -> None:
        await delivery.ack()
        acked.append(1)

    consumer = await transport.subscribe(subscription, ack)
    backlog = await backlog_until(
        transport, subscription, lambda b: b.pending == 0 and not b.in_flight and len(acked) == N, "drained"
    )
    assert backlog.oldest_age_s in (None, 0.0)
    await consumer.stop()


async def test_backlog_of_transport_without_the_capability_is_none() -> None:
    class Bare:
        pass

    assert await ports.backlog_of(Bare(), ports.Subscription(name="a", topic="b")) is None


async def test_scaling_of_a_running_worker_reports_capacity_in_flight_and_backlog(open_transport: Open) -> None:
    topic, name = unique("bl"), unique("bl")
    release = asyncio.Event()

    @on(topic, name=name, concurrency=2)
    async def slow(payload: dict) -> None:
        await release.wait()

    transport = await open_transport()
    worker = Worker(registry.Registry.of(slow).handlers, transport, source="t")
    await worker.start()
    reporter = scaling.ScalingReporter(transport, worker)
    site = http.create_app([], scaling=reporter.snapshot)
    await publish(transport, topic, N)

    async def entry() -> dict[str, Any]:
        await reporter.refresh()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=site), base_url="http://worker")
        async with client:
            response = await client.get("/scaling")
        assert response.status_code == 200
        [found] = response.json()["handlers"]
        return dict(found)

    deadline = time.monotonic() + 20
    while (busy := await entry())["in_flight"] < 2 or busy["backlog"] is None:
        assert time.monotonic() < deadline, busy
        await asyncio.sleep(0.2)
    assert (busy["handler"], busy["topic"], busy["capacity"], busy["error"]) == (name, topic, 2, None)
    release.set()
    while (idle := await entry())["backlog"] != 0 or idle["in_flight"]:
        assert time.monotonic() < deadline, idle
        await asyncio.sleep(0.2)
    assert prometheus_client.REGISTRY.get_sample_value("conveyor_backlog", {"handler": name}) == 0
    assert await worker.stop(5)
