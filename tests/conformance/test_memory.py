"""The memory transport (the reference) against both conformance suites."""

from collections.abc import Callable

import pytest
from conveyor import ports
from conveyor.testing import TransportConformance, WorkerConformance, unique
from conveyor.transports.memory import MemoryTransport


@pytest.fixture
def memory_factory() -> Callable[[], ports.Transport]:
    url = f"memory://{unique('broker')}"
    return lambda: MemoryTransport(url)


class TestMemoryTransport(TransportConformance):
    @pytest.fixture
    def make_transport(self, memory_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return memory_factory


class TestMemoryWorker(WorkerConformance):
    @pytest.fixture
    def make_transport(self, memory_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return memory_factory
