"""Test kits: conformance suites that every backend passes, and test helpers.

A new transport proves itself by subclassing the suites::

    from conveyor.testing import TransportConformance, WorkerConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def make_transport(self):
            return lambda: MyTransport("my://localhost")
"""

from conveyor.testing.persistence_suite import PersistenceConformance
from conveyor.testing.support import Collector, issued_here, remains, unique, wait_for
from conveyor.testing.transport_suite import TransportConformance, TransportFixtures
from conveyor.testing.worker_suite import WorkerConformance

__all__ = [
    "Collector",
    "PersistenceConformance",
    "TransportConformance",
    "TransportFixtures",
    "WorkerConformance",
    "issued_here",
    "remains",
    "unique",
    "wait_for",
]
