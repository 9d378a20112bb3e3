"""``conveyor worker --processes N``: the supervisor's ``/metrics`` is the sum of its children's.

Two children share a handler on NATS; the test publishes with
:class:`conveyor.Publisher` and scrapes the supervisor (port P) and each child
(P + 1, P + 2).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from cli import Process, free_port_block, migrated
from conveyor import Publisher
from conveyor.testing import unique
from test_supervisor import child_pids

APP = """
import asyncio
import os

from conveyor import on


@on(os.environ["METRICS_TOPIC"], name=os.environ["METRICS_HANDLER"], concurrency=2)
async def work(job: dict) -> None:
    await asyncio.sleep(0.01)  # slow enough that both children take a share
"""
COUNT = 100


def succeeded(port: int, handler: str) -> float:
    """``conveyor_messages_total{handler, outcome="succeeded"}`` scraped from ``port`` (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    pattern = rf'conveyor_messages_total{{handler="{re.escape(handler)}",outcome="succeeded"}} (\S+)'
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str, process: Process) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.popen.poll() is None, f"the supervisor exited while waiting for {what}:\n{process.text()}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}:\n{process.text()}"
        time.sleep(0.2)


def publish(url: str, topic: str, count: int) -> None:
    async def run() -> None:
        async with Publisher(url, source="e2e") as publisher:
            for n in range(count):
                await publisher.publish(topic, {"n": n}, key=f"k{n}")

    asyncio.run(run())


class Supervised(NamedTuple):
    process: Process
    port: int
    broker_url: str
    topic: str
    handler: str


OPERATOR_DIR = "metrics"
"""A parameter of :func:`supervised`: run with ``PROMETHEUS_MULTIPROC_DIR`` set to ``tmp_path / "metrics"``."""


@pytest.fixture
def supervised(request: pytest.FixtureRequest, nats_url: str, tmp_path: Path) -> Iterator[Supervised]:
    """A ready ``conveyor worker --processes 2`` on NATS whose children share one handler."""
    topic, handler = unique("mp"), unique("mp")
    (tmp_path / "mpapp.py").write_text(APP)
    env = {
        "CONVEYOR_BROKER_URL": nats_url, "CONVEYOR_APP": "mpapp", "CONVEYOR_APP_DIR": str(tmp_path),
        "METRICS_TOPIC": topic, "METRICS_HANDLER": handler, **migrated(tmp_path),
    }  # fmt: skip
    if getattr(request, "param", None) == OPERATOR_DIR:
        (tmp_path / OPERATOR_DIR).mkdir()
        (tmp_path / OPERATOR_DIR / "counter_1.db").write_bytes(b"left by an earlier run")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / OPERATOR_DIR)
    port = free_port_block(3)
    process = Process(["worker", "--processes", "2", "--port", str(port)], tmp_path / "sup.log", cwd=tmp_path, **env)
    try:
        process.wait_ready(port, timeout=60)
        yield Supervised(process, port, nats_url, topic, handler)
        assert process.terminate() == 0, process.text()
    finally:
        process.close()


def test_supervisor_metrics_with_two_children_sum_their_counters(supervised: Supervised) -> None:
    process, port, url, topic, handler = supervised
    publish(url, topic, COUNT)
    wait_until(lambda: succeeded(port, handler) >= COUNT, 60, f"{COUNT} messages in the aggregate", process)
    first, second = succeeded(port + 1, handler), succeeded(port + 2, handler)
    assert (succeeded(port, handler), first + second) == (COUNT, COUNT)
    assert 0 < first < COUNT and 0 < second < COUNT, f"one child handled everything: {first}, {second}"


def test_supervisor_metrics_after_a_child_is_killed_keep_its_counts(supervised: Supervised) -> None:
    process, port, url, topic, handler = supervised
    publish(url, topic, COUNT)
    wait_until(lambda: succeeded(port, handler) >= COUNT, 60, f"{COUNT} messages in the aggregate", process)
    first, _second = child_pids(process)  # worker 1, on port + 1
    assert succeeded(port + 1, handler) > 0, "the child about to be killed handled nothing"
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: len(child_pids(process)) == 3, 30, "a replacement worker", process)
    process.wait_ready(port, timeout=60)
    # At least: a message the dead child counted but had not acked yet may come again.
    assert succeeded(port, handler) >= COUNT, "the dead child's counts left the aggregate"


@pytest.mark.parametrize("supervised", [OPERATOR_DIR], indirect=True)
def test_supervisor_metrics_with_operators_dir_use_it_emptied(supervised: Supervised, tmp_path: Path) -> None:
    process, port, url, topic, handler = supervised
    publish(url, topic, COUNT)
    wait_until(lambda: succeeded(port, handler) >= COUNT, 60, f"{COUNT} messages in the aggregate", process)
    files = {path.name for path in (tmp_path / OPERATOR_DIR).glob("*.db")}
    assert "counter_1.db" not in files, "an earlier run's file was left to be summed"
    assert {f"counter_{pid}.db" for pid in child_pids(process)} <= files
