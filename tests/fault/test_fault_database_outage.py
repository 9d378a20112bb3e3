"""PostgreSQL unreachable for 20 s while a worker's handler transactions run: held, not failed.

The worker reaches PostgreSQL through a :class:`services.ThreadedProxy`; the
test reads the ledger directly. Once about a third of the messages have their
effect the proxy either cuts every connection and refuses new ones (the host
went away) or freezes them, forwarding nothing and closing nothing (a network
partition or a failover: statements time out mid-flight), for
:data:`OUTAGE_S` seconds. The worker must hold the messages it has (spending
no attempts, dead-lettering nothing), report ``/readyz`` unhealthy meanwhile,
and resume within the outage backoff once the database is back. A commit whose
answer was cut off is retried and absorbed by the inbox.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import ledger
import pytest
import services
import workload
from conveyor.runtime.handling import OUTAGE_BACKOFF
from sqlalchemy.engine import make_url

COUNT = 1500
OUTAGE_S = 20.0
DETECT_S = 5.0
"""Longest the worker may take to report ``/readyz`` unhealthy once the database is gone."""


def limit(outage_s: float) -> float:
    """The longest stall after the restore that the outage policy allows, for an outage this long.

    A held message is tried again after a pause doubling from 0.5 s to 30 s (``OUTAGE_BACKOFF``), so
    the pause in progress when the database returns is at most as long as the outage so far, and at
    most the cap; 5 s more for the connection pool to reconnect and the first commits to land.
    """
    return min(outage_s, OUTAGE_BACKOFF[1]) + 5.0


def readiness(port: int, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    """Poll the worker's ``/readyz`` every 0.2 s until ``stop``, recording ``(time, status)`` (0: no answer)."""
    while not stop.is_set():
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
        except httpx.HTTPError:
            status = 0
        seen.append((time.time(), status))
        stop.wait(0.2)


@pytest.mark.parametrize("mode", ["cut", "freeze"])
def test_database_outage_holds_messages_and_loses_doubles_nothing(rabbit_url: str, tmp_path: Path, mode: str) -> None:
    with workload.Scenario(tmp_path, rabbit_url) as scenario:
        real = make_url(scenario.database_url)
        with services.ThreadedProxy(real.host or "127.0.0.1", real.port or 5432) as proxy:
            proxied = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            # Frozen, statements hang: a 2 s timeout makes attempts time out mid-statement again and again.
            timeout = {"FAULT_TIMEOUT": "2"} if mode == "freeze" else {}
            worker, port = scenario.worker("worker", CONVEYOR_DATABASE_URL=proxied, **timeout)
            publisher = threading.Thread(
                target=workload.publish, args=(rabbit_url, scenario.topic, range(COUNT)), daemon=True
            )
            publisher.start()
            scenario.wait_handled(COUNT // 3, timeout=60)
            seen: list[tuple[float, int]] = []
            stop = threading.Event()
            poller = threading.Thread(target=readiness, args=(port, stop, seen), daemon=True)
            cut_at = time.time()
            proxy.cut() if mode == "cut" else proxy.freeze()
            poller.start()
            at_cut = scenario.handled()
            time.sleep(OUTAGE_S)  # the outage itself: held on purpose
            stop.set()
            poller.join()  # before the restore: every poll recorded saw the database gone
            restored_at = time.time()
            proxy.restore()
            outage = restored_at - cut_at
            publisher.join(60)
            gave_up = scenario.finish(COUNT, timeout=limit(outage) + 30)
            worker.wait_ready(port, timeout=30)
            metrics = scenario.metrics(port)
            dead_letters = scenario.dead_letters()
            rows = scenario.effects()
            logs = scenario.logs()
    counts = ledger.tally(rows, range(COUNT))
    dead = workload.metric(metrics, "conveyor_messages_total", handler=scenario.handler, outcome="dead_lettered")
    holds = workload.metric(metrics, "conveyor_outage_waits_total", handler=scenario.handler, dependency="database")
    result = ledger.report(
        ledger.Result(
            scenario=f"database {'unreachable' if mode == 'cut' else 'frozen'} 20 s", broker="rabbit", load=COUNT,
            faults=1, bad_inputs=0,
            lost=counts.lost, doubled=counts.doubled, stalled_s=workload.stall(rows, restored_at, gave_up),
            limit_s=limit(outage),
        )
    )  # fmt: skip
    unready = [at for at, status in seen if status != 200]
    first_unready = min(unready, default=float("inf")) - cut_at
    ready_again = [at for at, status in seen if status == 200 and unready and at > unready[0]]
    print(
        f"cut at {at_cut}/{COUNT}; /readyz unhealthy {first_unready:.1f}s after the cut, "
        f"{len(unready)}/{len(seen)} polls; {holds:.0f} holds; dead-lettered {dead:.0f}; {result}"
    )
    assert holds > 0, f"the worker never held a message: the outage did not reach it\n{logs}"
    assert result.ok, f"{result}\n{logs}"
    assert dead == 0, f"{dead} messages dead-lettered by a database outage\n{logs}"
    assert "no dead letters" in dead_letters, dead_letters
    assert first_unready <= DETECT_S, f"/readyz stayed 200 for {first_unready:.1f}s of the outage: {seen}"
    assert not ready_again, f"/readyz answered 200 during the outage: {seen}"
