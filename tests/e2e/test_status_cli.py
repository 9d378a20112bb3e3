"""The autoscaling signal as operators see it: ``conveyor status``, and ``/scaling`` and ``/metrics`` of a process."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from cli import ROOT, Process, free_port, migrated, run
from conveyor import envelope, on, ports, registry
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique
from conveyor.transports.rabbit import RabbitTransport

APP = """
from conveyor import on

@on({topic!r}, name={name!r}, concurrency=3)
async def waiting(payload: dict) -> None:
    pass
"""


async def test_status_prints_each_handler_with_its_backlog(tmp_path: Path, rabbit_url: str) -> None:
    topic, name = unique("status"), unique("status")
    (tmp_path / "statusapp.py").write_text(APP.format(topic=topic, name=name))

    @on(topic, name=name, concurrency=3)
    async def waiting(payload: dict) -> None:
        pass

    transport = RabbitTransport(rabbit_url)
    await transport.connect()
    plan = Worker(registry.Registry.of(waiting).handlers, transport, source="t")
    try:
        await plan.declare()
        for n in range(3):
            event = envelope.create(topic, {"n": n}, source="t")
            await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))
        [subscription] = plan.subscriptions()
        assert await ports.backlog_of(transport, subscription) == ports.Backlog(pending=3)
        result = await asyncio.to_thread(
            run, ["status", "--app", "statusapp"], cwd=tmp_path, CONVEYOR_BROKER_URL=rabbit_url
        )
        as_json = await asyncio.to_thread(
            run, ["status", "--app", "statusapp", "--json"], cwd=tmp_path, CONVEYOR_BROKER_URL=rabbit_url
        )
    finally:
        queues = brokers.rabbit_subscription_queues(
            transport, [*plan.subscriptions(), *plan.dead_letter_subscriptions()]
        )
        await transport.close()
        await brokers.delete_rabbit_queues(rabbit_url, queues)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "TOPIC", "BACKLOG", "OLDEST", "AGE", "CAPACITY"]
    assert row.split() == [name, topic, "3", "-", "3"]
    assert as_json.returncode == 0, as_json.stderr
    [entry] = orjson.loads(as_json.stdout)
    assert (entry["handler"], entry["topic"], entry["backlog"], entry["capacity"], entry["error"]) == (
        name, topic, 3, 3, None,
    )  # fmt: skip


def test_status_of_an_undeclared_subscription_shows_a_dash_and_exits_1(tmp_path: Path, rabbit_url: str) -> None:
    topic, name = unique("status"), unique("status")
    (tmp_path / "statusapp.py").write_text(APP.format(topic=topic, name=name))
    result = run(["status", "--app", "statusapp"], cwd=tmp_path, CONVEYOR_BROKER_URL=rabbit_url)
    assert result.returncode == 1
    assert result.stdout.splitlines()[1].split() == [name, topic, "-", "-", "3"]
    assert name in result.stderr
    as_json = run(["status", "--app", "statusapp", "--json"], cwd=tmp_path, CONVEYOR_BROKER_URL=rabbit_url)
    assert as_json.returncode == 1
    [entry] = orjson.loads(as_json.stdout)
    assert entry["backlog"] is None and name in entry["error"]


def test_status_on_the_memory_broker_exits_2_naming_the_alternative(tmp_path: Path) -> None:
    result = run(["status"], CONVEYOR_BROKER_URL="memory://")
    assert result.returncode == 2
    assert "GET /scaling" in result.stderr


def test_status_on_the_default_memory_broker_names_the_console_page_to_open() -> None:
    result = run(["status"])
    assert result.returncode == 2
    assert "open the console of that process, http://127.0.0.1:8000/console/" in result.stderr, result.stderr
    assert "--broker-url" in result.stderr


def test_status_help_explains_its_columns() -> None:
    result = run(["status", "--help"])
    explained = result.stdout.split("Columns:", 1)[-1]
    for column in ("BACKLOG", "OLDEST AGE", "CAPACITY"):
        assert re.search(rf"\n +{re.escape(column)} ", explained), result.stdout


def scaling(port: int) -> list[dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{port}/scaling", timeout=5)
    assert response.status_code == 200, response.text
    handlers: list[dict[str, Any]] = response.json()["handlers"]
    return handlers


def test_running_process_serves_scaling_and_backlog_metrics_for_every_handler(tmp_path: Path) -> None:
    port = free_port()
    process = Process(
        ["run", "--port", str(port)],
        tmp_path / "run.log",
        cwd=tmp_path,
        CONVEYOR_APP_DIR=str(ROOT),
        **migrated(tmp_path),
    )
    try:
        process.wait_ready(port)
        deadline = time.monotonic() + 10
        handlers = scaling(port)
        while any(h["backlog"] is None for h in handlers):  # until the first read
            assert time.monotonic() < deadline, handlers
            time.sleep(0.1)
            handlers = scaling(port)
        listed = run(["handlers"], CONVEYOR_APP_DIR=str(ROOT)).stdout.splitlines()[1:]
        assert {h["handler"] for h in handlers} >= {line.split()[0] for line in listed}
        assert all(h["capacity"] >= 1 and h["backlog"] == 0 and h["error"] is None for h in handlers)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert f'conveyor_backlog{{handler="{handlers[0]["handler"]}"}} 0.0' in metrics
        assert "conveyor_capacity{" in metrics
    finally:
        process.close()


def test_dlq_list_on_the_default_memory_broker_names_the_console_page_to_open() -> None:
    result = run(["dlq", "list", "orders.placed"])
    assert result.returncode == 2
    assert "http://127.0.0.1:8000/console/dead-letters" in result.stderr, result.stderr
