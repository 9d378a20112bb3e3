"""The example checkout saga across real ``conveyor`` processes: a billing worker killed, a saga worker crashing.

Processes, as an operator runs them: ``conveyor worker --app
handlers.checkout,handlers.inventory,handlers.shipping`` (the saga's handlers,
``sagas.shop.checkout`` and ``sagas.shop.checkout.start``, run in this process
only), ``conveyor worker --app handlers.billing`` (the only billing process) and
``conveyor relay`` (the whole app, so it declares every subscription). The
example's services share one fresh PostgreSQL database in this test; in
production each would have its own. Orders are placed through the outbox, as a
shop's own transaction would.

On RabbitMQ the processes run in a virtual host of their own (made with
``rabbitmqctl`` and deleted afterwards), because the example's queue names are
fixed; where ``rabbitmqctl`` cannot reach the node, the broker URL's own vhost is
used as it is.

RabbitMQ requeues a killed consumer's unacknowledged messages at once; NATS
redelivers them after the consumer's ``ack_wait`` (15 s: the worker keeps what
it holds alive with in-progress acks), well within the example's 60 s step
timeouts, so on both brokers every order under the card limit completes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import databases
import pytest
import sqlalchemy as sa
from cli import ROOT, Process, free_port
from conveyor.testing import unique

from event_store import Database, Outbox
from event_store.database import normalize_url
from handlers import billing
from handlers.models import OrderPlaced

SAGA = "shop.checkout"
SAGA_APP = "handlers.checkout,handlers.inventory,handlers.shipping"
ORDERS = 30
DEADLINE = 90.0
COMPLETED_LOG = [
    ("", "started"), ("reserve", "sent"), ("reserve", "replied"), ("charge", "sent"), ("charge", "replied"),
    ("ship", "sent"), ("ship", "replied"), ("", "completed"),
]  # fmt: skip
COMPENSATED_LOG = [
    ("", "started"), ("reserve", "sent"), ("reserve", "replied"), ("charge", "sent"), ("charge", "failed"),
    ("", "compensating"), ("reserve", "undo sent"), ("reserve", "undone"), ("", "compensated"),
]  # fmt: skip


def total_of(n: int) -> int:
    """Every fifth order is declined; every fifth other one times out at the gateway once (a retry)."""
    if n % 5 == 4:
        return billing.DECLINE_ABOVE_CENTS + 1 + n
    if n % 5 == 2:
        return billing.LARGE_ORDER_CENTS + n
    return 1_000 + n


class Db:
    """Synchronous queries on the test's database."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(normalize_url(url, sync=True))

    def rows(self, sql: str, **params: object) -> list[tuple[object, ...]]:
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql), params)]

    def count(self, sql: str, **params: object) -> int:
        return int(self.rows(sql, **params)[0][0])  # type: ignore[call-overload]

    def statuses(self) -> dict[str, str]:
        return {str(i): str(s) for i, s in self.rows("SELECT id, status FROM sagas WHERE saga = :s", s=SAGA)}

    def finished(self) -> int:
        return self.count("SELECT count(*) FROM sagas WHERE status IN ('completed', 'compensated')")

    def charges(self) -> collections.Counter[str]:
        rows = self.rows("SELECT stream_id FROM events WHERE type = 'PaymentCharged'")
        return collections.Counter(str(stream).removeprefix("payment-") for (stream,) in rows)

    def payments(self) -> dict[str, list[str]]:
        """Each order's payment events, in order."""
        found: dict[str, list[str]] = collections.defaultdict(list)
        for stream, kind in self.rows("SELECT stream_id, type FROM events ORDER BY position"):
            found[str(stream).removeprefix("payment-")].append(str(kind))
        return found

    def logs(self) -> dict[str, list[tuple[str, str]]]:
        found: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        query = "SELECT instance_id, step, event FROM saga_log WHERE saga = :s ORDER BY id"
        for instance, step, event in self.rows(query, s=SAGA):
            found[str(instance)].append((str(step), str(event)))
        return found


async def place(url: str, totals: dict[str, int]) -> None:
    database = Database(url)
    try:
        async with database.transaction() as session:
            for order_id, total in totals.items():
                order = OrderPlaced(order_id=order_id, customer=f"{order_id}@example.com", total_cents=total)
                await Outbox("shop").add(session, "orders.placed", order, key=order_id)
    finally:
        await database.close()


@contextlib.contextmanager
def own_vhost(url: str) -> Iterator[str]:
    """``url`` on a fresh RabbitMQ virtual host, deleted afterwards (``url`` itself if ``rabbitmqctl`` cannot)."""
    parts = urlsplit(url)
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        yield url
        return
    vhost, user = unique("saga-e2e"), parts.username or "guest"

    def ctl_run(*args: str) -> bool:
        done = subprocess.run([ctl, "-q", *args], capture_output=True, timeout=60, check=False)
        return done.returncode == 0

    if not (ctl_run("add_vhost", vhost) and ctl_run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")):
        ctl_run("delete_vhost", vhost)
        yield url
        return
    try:
        yield urlunsplit(parts._replace(path="/" + vhost))
    finally:
        ctl_run("delete_vhost", vhost)


@pytest.fixture
def database_url() -> Iterator[str]:
    url = databases.create("postgres")
    yield url
    databases.drop(url)


class Fleet:
    """The test's ``conveyor`` processes; every one still running is killed at the end."""

    def __init__(self, directory: Path, **env: str) -> None:
        self.directory, self.env = directory, env
        self.started: list[Process] = []

    def start(self, command: str, app: str, *, ready: bool = True, **env: str) -> Process:
        """Start ``conveyor <command>`` with ``CONVEYOR_APP=app``; wait until it is ready unless told not to."""
        port = free_port()
        label = "sagas" if app == SAGA_APP else app.rsplit(".", 1)[-1]
        log = self.directory / f"{len(self.started) + 1:02d}-{command}-{label}.log"
        process = Process([command, "--port", str(port)], log, cwd=ROOT, **{**self.env, "CONVEYOR_APP": app, **env})
        self.started.append(process)
        if ready:
            process.wait_ready(port, timeout=30)
        return process

    def check_alive(self, *processes: Process) -> None:
        for process in processes:
            assert process.popen.poll() is None, f"{process.log.name} exited:\n{process.text()}"

    def close(self) -> None:
        for process in self.started:
            process.close()


def wait_until(condition: Callable[[], bool], deadline: float, what: str, check: Callable[[], None], db: Db) -> None:
    """Poll ``condition`` until ``deadline`` (monotonic), running ``check`` (processes alive) meanwhile."""
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; saga statuses: {collections.Counter(db.statuses().values())}"
            )
        time.sleep(0.1)


@pytest.fixture(params=["rabbit", "nats"])
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A broker URL (RabbitMQ on a virtual host of its own)."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    if request.param == "rabbit":
        with own_vhost(url) as isolated:
            yield isolated
    else:
        yield url


def test_checkout_sagas_survive_a_killed_billing_worker_each_order_charged_once(
    broker: str, database_url: str, tmp_path: Path
) -> None:
    broker_url = broker
    totals = {f"o-{n:02d}": total_of(n) for n in range(ORDERS)}
    declined = {o for o, total in totals.items() if total > billing.DECLINE_ABOVE_CENTS}
    accepted = set(totals) - declined
    db = Db(database_url)
    fleet = Fleet(tmp_path, CONVEYOR_DATABASE_URL=database_url, CONVEYOR_BROKER_URL=broker_url,
                  CONVEYOR_APP_DIR=str(ROOT))  # fmt: skip
    began = time.monotonic()
    deadline = began + DEADLINE
    try:
        asyncio.run(place(database_url, totals))
        sagas = fleet.start("worker", SAGA_APP)
        payments = fleet.start("worker", "handlers.billing")
        relay = fleet.start("relay", "handlers")
        wait_until(lambda: len(db.charges()) >= len(accepted) // 3, deadline, "a third of the charges",
                   lambda: fleet.check_alive(sagas, payments, relay), db)  # fmt: skip
        payments.popen.kill()  # SIGKILL: in-flight charges are neither finished nor acknowledged
        payments.popen.wait()
        charged_at_kill = len(db.charges())
        time.sleep(3)  # the billing service is down for a while; commands queue up
        payments = fleet.start("worker", "handlers.billing")
        wait_until(lambda: db.finished() == ORDERS, deadline, f"{ORDERS} finished sagas",
                   lambda: fleet.check_alive(sagas, payments, relay), db)  # fmt: skip
        elapsed = time.monotonic() - began
        for process in (relay, payments, sagas):
            assert process.terminate() == 0, process.text()
    finally:
        fleet.close()
    statuses, paid, logs = db.statuses(), db.payments(), db.logs()
    db.engine.dispose()
    assert charged_at_kill < len(accepted), "every charge was done before the kill: nothing was interrupted"
    seen = {o: [entry for entry in logs[o] if entry[1] != "ignored"] for o in totals}
    print(f"\n{ORDERS} sagas on {urlsplit(broker_url).scheme} in {elapsed:.1f}s; {charged_at_kill} charged at the kill")
    assert {o for o, s in statuses.items() if s == "completed"} == accepted, f"outcomes: {statuses}"
    assert {o for o, s in statuses.items() if s == "compensated"} == declined, f"outcomes: {statuses}"
    wrong_payments = {
        o: paid.get(o, []) for o in totals if paid.get(o, []) != (["PaymentCharged"] if o in accepted else [])
    }
    assert not wrong_payments, f"orders charged twice, or charged and not completed: {wrong_payments}"
    expected = {o: COMPENSATED_LOG if o in declined else COMPLETED_LOG for o in totals}
    wrong = {o: seen[o] for o in totals if seen[o] != expected[o]}
    assert not wrong, f"unexpected step logs (a step replied twice, or never): {wrong}"


def test_a_saga_worker_dying_after_every_commit_completes_the_saga_with_each_effect_once(
    rabbit_url: str, database_url: str, tmp_path: Path
) -> None:
    db = Db(database_url)
    with own_vhost(rabbit_url) as broker_url:
        fleet = Fleet(tmp_path, CONVEYOR_DATABASE_URL=database_url, CONVEYOR_BROKER_URL=broker_url,
                      CONVEYOR_APP_DIR=str(ROOT))  # fmt: skip
        crashes = 0
        began = time.monotonic()
        deadline = began + DEADLINE
        try:
            asyncio.run(place(database_url, {"o-crash": 4200}))
            payments = fleet.start("worker", "handlers.billing")
            relay = fleet.start("relay", "handlers")
            completed = False
            while not completed:
                assert crashes < 20, f"the saga is not completed after {crashes} restarts: {db.logs()}"
                sagas = fleet.start("worker", SAGA_APP, ready=False, CONVEYOR_CRASH_AT="handler.after-commit")
                while sagas.popen.poll() is None and not completed:
                    fleet.check_alive(payments, relay)
                    assert time.monotonic() < deadline, f"no crash nor completion in time:\n{sagas.text()}"
                    completed = db.statuses().get("o-crash") == "completed"
                    time.sleep(0.1)
                if sagas.popen.poll() is None:
                    sagas.close()  # completed: it only waits for more work now
                else:
                    assert sagas.popen.wait() == 70, f"the saga worker died otherwise:\n{sagas.text()}"
                    crashes += 1
                    completed = db.statuses().get("o-crash") == "completed"
            for process in (relay, payments):
                assert process.terminate() == 0, process.text()
        finally:
            fleet.close()
    print(f"\nthe saga completed after {crashes} crashes in {time.monotonic() - began:.1f}s")
    charges, log = db.charges(), db.logs()["o-crash"]
    db.engine.dispose()
    # The start and each of the three replies commit a transition, each followed by a crash.
    assert crashes >= 4, f"only {crashes} crashes: the crash point did not follow every transition"
    assert charges == {"o-crash": 1}
    assert log == COMPLETED_LOG, "a replayed message applied a transition again (or one is missing)"
