"""Local services for tests and benchmarks: free ports, readiness polls, RabbitMQ queue cleanup.

:func:`require_service` lets tests skip (locally) or fail (in CI) when a RabbitMQ, NATS or
PostgreSQL server is not listening. Brokers that tests start themselves (Tansu for Kafka, a
current nats-server) are in :mod:`conveyor.testing.servers`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from conveyor import ports

__all__ = [
    "START_COMMANDS",
    "delete_rabbit_queues",
    "delete_test_queues",
    "free_port",
    "port_open",
    "rabbit_queue_names",
    "rabbit_subscription_queues",
    "require_service",
    "wait_for_port",
]

#: How to start each local service on a machine without Docker, keyed by lower-case name.
START_COMMANDS: dict[str, str] = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "rabbitmq": "rabbitmq-server -detached",
    "nats": (
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
        "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
    ),
    "kafka": "docker compose -f compose/docker-compose.yml up -d --wait kafka",
}
_ALIASES = {"postgres": "postgresql", "pg": "postgresql", "rabbit": "rabbitmq", "jetstream": "nats"}
_ALL_SERVICES_HINT = "compose/start-local-services.sh"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    The port is found by binding port 0 and closing the socket, so another process may
    still grab it before the caller binds it; callers that spawn servers should retry.

    Args:
        host: The interface to probe.

    Returns:
        A port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Tell whether something accepts TCP connections on ``host:port``.

    Args:
        host: Host name or address.
        port: TCP port.
        timeout: Seconds to wait for the connection.

    Returns:
        True if a connection was established (and then closed).
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Poll until ``host:port`` accepts TCP connections.

    Args:
        host: Host name or address.
        port: TCP port.
        timeout: Seconds to keep trying.

    Raises:
        TimeoutError: Nothing accepted a connection within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not port_open(host, port, timeout=min(0.5, max(timeout, 0.01))):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepted TCP connections on {host}:{port} within {timeout:g}s")
        time.sleep(0.05)


def with_query(url: str, query: str) -> str:
    """``url`` with ``query`` (``a=1&b=2``, with or without a leading ``?``) added to its query string."""
    query = query.lstrip("?")
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


def in_ci() -> bool:
    """True when env ``CI`` is set to anything but an empty, ``0``, ``false`` or ``no`` value.

    CI systems spell it differently (``true``, ``1``, ``yes``, a provider's name):
    any of them means a missing service must fail, not skip.
    """
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (in CI) the calling test unless ``host:port`` is listening.

    Args:
        name: Service name for the message: ``PostgreSQL``, ``RabbitMQ``, ``NATS`` or
            ``Kafka`` (case-insensitive; other names get a generic hint).
        host: Host name or address of the service.
        port: Its TCP port.

    Raises:
        pytest.fail.Exception: The service is down in CI (see :func:`in_ci`).
        pytest.skip.Exception: The service is down elsewhere; the message says how to start it.
    """
    if port_open(host, port, timeout=1.0):
        return
    import pytest

    message = f"{name} is not reachable on {host}:{port}"
    if in_ci():
        pytest.fail(f"{message} (in CI a missing service is a failure)", pytrace=False)
    key = name.lower()
    command = START_COMMANDS.get(_ALIASES.get(key, key))
    hint = f"start it with `{command}`" if command else "start it"
    pytest.skip(f"{message}; {hint}, or start every service with `{_ALL_SERVICES_HINT}`")


# -- RabbitMQ queues left by tests -------------------------------------------------------


def rabbit_queue_names(timeout: float = 20.0, *, what: str = "queues") -> list[str] | None:
    """Names of every queue (or, with ``what="exchanges"``, exchange) of the local RabbitMQ node (``rabbitmqctl``).

    Without the management plugin, ``rabbitmqctl`` is the only way to list
    queues; AMQP cannot.

    Returns:
        The names, or None when ``rabbitmqctl`` is missing, refused or too slow.
    """
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    command = [ctl, "-q", f"list_{what}", "name", "--no-table-headers", "--timeout", str(max(int(timeout), 1))]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def rabbit_subscription_queues(transport: Any, subscriptions: Sequence[ports.Subscription]) -> list[str]:
    """The queues a RabbitTransport keeps for ``subscriptions``: each subscription's queue and binding record."""
    return [
        queue
        for subscription in subscriptions
        for queue in (transport.queue_name(subscription), f"{transport.exchange}-binding.{subscription.name}")
    ]


async def delete_rabbit_queues(url: str, names: list[str], timeout: float = 10.0) -> list[str]:
    """Delete the named queues (consumers, messages and all; a missing queue is no error).

    Returns:
        The queues deleted.
    """
    if not names:
        return []
    import aio_pika

    deleted: list[str] = []
    connection = await aio_pika.connect(url, timeout=timeout)
    async with connection:
        channel = await connection.channel()
        for name in names:
            try:
                await asyncio.wait_for(channel.queue_delete(name), timeout)
                deleted.append(name)
            except Exception:  # a channel error closes the channel: go on with a new one
                if channel.is_closed:
                    channel = await connection.channel()
    return deleted


async def delete_test_queues(url: str, timeout: float = 20.0) -> list[str]:
    """Delete the local RabbitMQ node's queues named after this process's :func:`~conveyor.testing.unique` names.

    Subscription queues, binding records and dead-letter keepers of every
    shape (``conveyor-limited.<name>``, ``conveyor-binding.<name>``, ``conveyor-kept.<name>``,
    ``conveyor.<name>`` of earlier versions ...) and the over-limit exchanges
    (``conveyor-over-limit.<name>``, deleted too) contain the unique name they were made from;
    the shared delay tiers (``conveyor-delay-quorum.<ms>ms``) do not, and stay.
    Queues of other test sessions on the same node are left alone: their tokens
    were issued by other processes. A remote broker (``url`` not on this host)
    or a node ``rabbitmqctl`` cannot list is left as it is.

    Returns:
        The queues deleted.
    """
    from urllib.parse import urlsplit

    from conveyor.testing.support import issued_here

    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return []
    names = await asyncio.to_thread(rabbit_queue_names, timeout)
    deleted = await delete_rabbit_queues(url, [name for name in names or [] if issued_here(name)], timeout)
    exchanges = await asyncio.to_thread(rabbit_queue_names, timeout, what="exchanges")
    await delete_rabbit_exchanges(url, [name for name in exchanges or [] if issued_here(name)], timeout)
    return deleted


async def delete_rabbit_exchanges(url: str, names: list[str], timeout: float = 10.0) -> None:
    """Delete the named exchanges (a missing one is no error): the over-limit exchanges subscriptions leave."""
    if not names:
        return
    import aio_pika

    connection = await aio_pika.connect(url, timeout=timeout)
    async with connection:
        channel = await connection.channel()
        for name in names:
            try:
                await asyncio.wait_for(channel.exchange_delete(name), timeout)
            except Exception:  # a channel error closes the channel: go on with a new one
                if channel.is_closed:
                    channel = await connection.channel()
