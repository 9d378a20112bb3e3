"""The RabbitMQ transport against both conformance suites (needs the local RabbitMQ).

Queues outlive connections: each test deletes the queues of the subscriptions it
declared, and the module ends by deleting any other queue of the local node
named after one of this process's ``unique()`` names (dead-letter keepers,
whatever shape they take).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest
from conveyor import ports
from conveyor.testing import TransportConformance, WorkerConformance, brokers
from conveyor.transports.rabbit import RabbitTransport


class TrackingRabbitTransport(RabbitTransport):
    """Records the subscriptions it declares so the test can delete their queues."""

    declared: dict[str, ports.Subscription]

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        self.declared.update((s.name, s) for s in subscriptions)
        await super().declare(topics, subscriptions)


async def delete_queues(url: str, transport: RabbitTransport, subscriptions: Sequence[ports.Subscription]) -> None:
    """Delete the queues (and binding records) of the subscriptions a test declared."""
    await brokers.delete_rabbit_queues(url, brokers.rabbit_subscription_queues(transport, subscriptions))


@pytest.fixture(scope="module", autouse=True)
def sweep_queues(rabbit_url: str) -> Iterator[None]:
    """After the module: delete what per-test cleanup missed (see ``brokers.delete_test_queues``)."""
    yield
    asyncio.run(brokers.delete_test_queues(rabbit_url))


@pytest.fixture
async def rabbit_factory(rabbit_url: str) -> AsyncIterator[Callable[[], ports.Transport]]:
    declared: dict[str, ports.Subscription] = {}

    def make() -> ports.Transport:
        transport = TrackingRabbitTransport(rabbit_url, reconnect_max=1.0)
        transport.declared = declared
        return transport

    yield make
    await delete_queues(rabbit_url, RabbitTransport(rabbit_url), list(declared.values()))


class TestRabbitTransport(TransportConformance):
    @pytest.fixture
    def make_transport(self, rabbit_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return rabbit_factory


class TestRabbitWorker(WorkerConformance):
    @pytest.fixture
    def make_transport(self, rabbit_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return rabbit_factory
