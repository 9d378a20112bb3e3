"""The RabbitMQ transport against both conformance suites (needs the local RabbitMQ)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import aio_pika
import pytest
from conveyor import ports
from conveyor.testing import TransportConformance, WorkerConformance
from conveyor.transports.rabbit import RabbitTransport


class TrackingRabbitTransport(RabbitTransport):
    """Records the subscriptions it declares so the test can delete their queues."""

    declared: set[str]

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        self.declared.update(s.name for s in subscriptions)
        await super().declare(topics, subscriptions)


async def delete_queues(url: str, transport: RabbitTransport, subscriptions: set[str]) -> None:
    """Delete the queues (and binding records) of the subscriptions a test declared."""
    connection = await aio_pika.connect(url)
    async with connection:
        for name in subscriptions:
            for queue in (transport.queue_name(name), f"{transport.exchange}-binding.{name}"):
                channel = await connection.channel()
                await channel.queue_delete(queue)
                await channel.close()


@pytest.fixture
async def rabbit_factory(rabbit_url: str) -> AsyncIterator[Callable[[], ports.Transport]]:
    declared: set[str] = set()

    def make() -> ports.Transport:
        transport = TrackingRabbitTransport(rabbit_url, reconnect_max=1.0)
        transport.declared = declared
        return transport

    yield make
    await delete_queues(rabbit_url, RabbitTransport(rabbit_url), declared)


class TestRabbitTransport(TransportConformance):
    @pytest.fixture
    def make_transport(self, rabbit_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return rabbit_factory


class TestRabbitWorker(WorkerConformance):
    @pytest.fixture
    def make_transport(self, rabbit_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return rabbit_factory
