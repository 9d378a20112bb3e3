"""Fixtures shared by the integration tests: one test per broker, transports closed after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conveyor import ports, transports
from conveyor.testing import brokers, unique

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
    """Opens connected transports to the test's broker; all are closed after the test."""
    opened: list[ports.Transport] = []

    async def open_one() -> ports.Transport:
        transport = transports.create(broker_url)
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_one
    for transport in opened:
        await transport.close()
