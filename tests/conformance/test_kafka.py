"""The Kafka transport against both conformance suites, on the session's Tansu broker.

Group joins and rebalances make Kafka slower than the other brokers, so the
suites' timeout is raised and the consumers use short session and heartbeat
intervals (URL options of :class:`~conveyor.transports.kafka.KafkaTransport`).
"""

from collections.abc import Callable

import pytest
from conveyor import ports
from conveyor.testing import TransportConformance, WorkerConformance, brokers
from conveyor.transports.kafka import KafkaTransport

OPTIONS = "partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400"


@pytest.fixture
def kafka_factory(kafka_url: str) -> Callable[[], ports.Transport]:
    url = brokers.with_query(kafka_url, OPTIONS)
    return lambda: KafkaTransport(url)


class TestKafkaTransport(TransportConformance):
    timeout = 30.0

    @pytest.fixture
    def make_transport(self, kafka_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return kafka_factory


class TestKafkaWorker(WorkerConformance):
    timeout = 30.0

    @pytest.fixture
    def make_transport(self, kafka_factory: Callable[[], ports.Transport]) -> Callable[[], ports.Transport]:
        return kafka_factory
