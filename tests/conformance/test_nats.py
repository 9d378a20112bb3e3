"""The NATS JetStream transport against both conformance suites."""

from collections.abc import Callable

import pytest
from conveyor import ports
from conveyor.testing import TransportConformance, WorkerConformance
from conveyor.transports.nats import NatsTransport

# Test durables are unique per test; let the server forget them after an hour.
INACTIVE_THRESHOLD = 3600.0


@pytest.fixture
def nats_factory(nats_url: str) -> Callable[[], ports.Transport]:
    return lambda: NatsTransport(nats_url, inactive_threshold=INACTIVE_THRESHOLD)


class TestNatsTransport(TransportConformance):
    @pytest.fixture
    def make_transport(self, nats_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return nats_factory


class TestNatsWorker(WorkerConformance):
    @pytest.fixture
    def make_transport(self, nats_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return nats_factory
