"""Servers a fault test may break: a dedicated RabbitMQ node, and a TCP fault proxy usable from sync code.

The machine's RabbitMQ (``rabbit@localhost`` on 5672) is shared with other test
runs and is never stopped or restarted here: a test that restarts a broker
starts its own node (:class:`RabbitNode`) with its own name, ports, Erlang
cookie, data and logs under a temporary directory, and stops it afterwards.
For NATS, :class:`conveyor.testing.servers.NatsServer` already restarts on the
same port and store.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from conveyor.testing.brokers import free_port, in_ci, port_open, wait_for_port
from fault_proxy import FaultProxy

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
"""The server script itself: ``/usr/sbin/rabbitmq-server`` would switch to the ``rabbitmq`` user."""


def require_rabbitmq_server() -> None:
    """Skip (locally) or fail (in CI) the calling test unless a RabbitMQ server can be started here."""
    if RABBITMQ_SERVER.exists():
        return
    import pytest

    message = f"no {RABBITMQ_SERVER} to start a dedicated RabbitMQ node"
    if in_ci():
        pytest.fail(f"{message} (in CI a missing service is a failure)", pytrace=False)
    pytest.skip(f"{message}; install rabbitmq-server")


class RabbitNode:
    """A single-node RabbitMQ of its own, in the foreground as a child process.

    Its node name (``fault-<port>@localhost``), AMQP and distribution ports,
    Erlang cookie (``HOME`` is its directory), Mnesia, logs, config and plugins
    (none) are its own; ``/etc/rabbitmq/rabbitmq-env.conf`` is not read. It
    cannot reach the shared node: a different cookie. :meth:`stop` then
    :meth:`start` is a restart with the same port and data, so durable queues
    and their messages come back.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"fault-{self.port}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="conveyor-rabbit-"))
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.home / "enabled_plugins").write_text("[].\n")
        (self.home / "rabbitmq-env.conf").write_text("")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/``."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home), RABBITMQ_CONF_ENV_FILE=str(self.home / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.home / "mnesia"), RABBITMQ_LOG_BASE=str(self.home / "log"),
            RABBITMQ_CONFIG_FILE=str(self.home / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.home / "enabled_plugins"),
            ERL_EPMD_ADDRESS="127.0.0.1", ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )  # fmt: skip
        return env

    def start(self, timeout: float = 60) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        if port_open("127.0.0.1", self.port):
            raise RuntimeError(f"port {self.port} of the dedicated RabbitMQ node is taken")
        with (self.home / "server.log").open("ab") as log:
            self._process = subprocess.Popen(
                [str(RABBITMQ_SERVER)], cwd=self.home, env=self._env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout)
        except TimeoutError:
            raise RuntimeError(f"RabbitMQ node {self.name} did not start:\n{self.log_tail()}") from None

    def stop(self, timeout: float = 30) -> None:
        """Stop the node gracefully (SIGTERM: the script runs the node's own shutdown); kill it if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the script and the Erlang VM
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the node's console output."""
        path = self.home / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def close(self) -> None:
        """Stop the node and delete its directory."""
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ThreadedProxy:
    """A :class:`FaultProxy` running on its own event loop in a daemon thread, driven from sync code.

    Args:
        host: the real server's host.
        port: the real server's port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._proxy = FaultProxy(host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    @property
    def port(self) -> int:
        """The local port clients connect to."""
        return int(self._proxy.port)

    def start(self) -> Self:
        """Start the loop and listen."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._proxy.start(), self._loop).result(10)
        return self

    def cut(self) -> None:
        """Close every connection and refuse new ones (see :meth:`FaultProxy.cut`)."""
        self._loop.call_soon_threadsafe(self._proxy.cut)

    def freeze(self) -> None:
        """Forward nothing and close nothing (see :meth:`FaultProxy.freeze`)."""
        self._loop.call_soon_threadsafe(self._proxy.freeze)

    def restore(self) -> None:
        """Forward again (see :meth:`FaultProxy.restore`)."""
        self._loop.call_soon_threadsafe(self._proxy.restore)

    def close(self) -> None:
        """Close the proxy and stop its loop."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._proxy.close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
