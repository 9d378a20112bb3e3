"""Fixtures shared by the integration tests: one test per broker, transports closed after the test.

RabbitMQ queues outlive their connections, so they are deleted after the
test that declared them (``open_transport``) and, as a backstop, at the end of
the session: every queue of the local node named after a ``unique()`` name of
this process (see :func:`conveyor.testing.brokers.delete_test_queues`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from conveyor import ports, transports
from conveyor.testing import brokers, unique
from conveyor.transports.rabbit import RabbitTransport

KAFKA_FAST = "?partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400"
Open = Callable[[], Awaitable[ports.Transport]]


@pytest.fixture(params=["memory", "rabbit", "nats", "kafka"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each test runs on the memory transport and on every real broker."""
    if request.param == "memory":
        return f"memory://{unique('it')}"
    url = str(request.getfixturevalue(f"{request.param}_url"))
    return brokers.with_query(url, KAFKA_FAST) if request.param == "kafka" else url


@pytest.fixture
async def open_transport(broker_url: str) -> AsyncIterator[Open]:
    """Opens connected transports to the test's broker; all are closed after the test.

    On RabbitMQ the queues of every subscription they declared are deleted too.
    """
    opened: list[ports.Transport] = []
    declared: dict[str, tuple[RabbitTransport, ports.Subscription]] = {}

    async def open_one() -> ports.Transport:
        transport = transports.create(broker_url)
        if isinstance(transport, RabbitTransport):
            rabbit, original = transport, transport.declare

            async def declare(topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
                declared.update((s.name, (rabbit, s)) for s in subscriptions)
                await original(topics, subscriptions)

            transport.declare = declare  # type: ignore[method-assign]
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in opened:
        await transport.close()
    if declared:
        queues = [q for rabbit, s in declared.values() for q in brokers.rabbit_subscription_queues(rabbit, [s])]
        await brokers.delete_rabbit_queues(broker_url, queues)
