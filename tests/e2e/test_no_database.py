"""``CONVEYOR_DATABASE_URL=none``: a worker whose handlers need no database opens none and loads no SQLAlchemy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from cli import Process, free_port, run
from conveyor import Publisher, ports
from conveyor.testing import brokers, unique
from conveyor.transports.rabbit import RabbitTransport

APP = """
import json, sys
from conveyor import on

@on({topic!r}, name={name!r})
async def record(payload: dict) -> None:
    with open({out!r}, "a") as f:
        f.write(json.dumps({{"n": payload["n"], "sqlalchemy": "sqlalchemy" in sys.modules}}) + "\\n")
"""

TRANSACTIONAL = """
from conveyor import on

@on("orders.nodb", name="orders.needs-db", transactional=True)
async def needs(payload: dict) -> None: ...
"""


async def test_a_worker_without_a_database_handles_messages_and_never_loads_sqlalchemy(
    tmp_path: Path, rabbit_url: str
) -> None:
    topic, name, out = unique("nodb"), unique("nodb"), tmp_path / "seen.jsonl"
    (tmp_path / "nodbapp.py").write_text(APP.format(topic=topic, name=name, out=str(out)))
    port = free_port()
    worker = Process(
        ["worker", "--app", "nodbapp", "--port", str(port)], tmp_path / "worker.log", cwd=tmp_path,
        CONVEYOR_BROKER_URL=rabbit_url, CONVEYOR_DATABASE_URL="none",
    )  # fmt: skip
    try:
        await asyncio.to_thread(worker.wait_ready, port)
        async with Publisher(rabbit_url, source="test") as publisher:
            await publisher.publish_many(topic, [{"n": n} for n in range(3)])
        deadline = time.monotonic() + 20
        while len(out.read_text().splitlines() if out.exists() else []) < 3:
            assert time.monotonic() < deadline, worker.text()
            await asyncio.sleep(0.1)
        seen = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(s["n"] for s in seen) == [0, 1, 2]
        assert not any(s["sqlalchemy"] for s in seen), "the worker loaded SQLAlchemy"
        assert "no database" in worker.text()
        assert worker.terminate() == 0
    finally:
        worker.close()
        transport = RabbitTransport(rabbit_url)
        await transport.connect()
        queues = brokers.rabbit_subscription_queues(transport, [ports.Subscription(name=name, topic=topic)])
        await transport.close()
        await brokers.delete_rabbit_queues(rabbit_url, [*queues, f"conveyor-kept.{topic}.dlq"])


def test_a_process_that_needs_a_database_refuses_none_naming_what_needs_it(tmp_path: Path) -> None:
    (tmp_path / "needsdb.py").write_text(TRANSACTIONAL)
    result = run(["worker", "--app", "needsdb", "--port", "0"], cwd=tmp_path, CONVEYOR_DATABASE_URL="none")
    assert result.returncode == 2, result.stderr
    assert "transactional handler orders.needs-db" in result.stderr
    assert "need(s) a database" in result.stderr
    relay = run(["relay", "--port", "0"], cwd=tmp_path, CONVEYOR_DATABASE_URL="none", CONVEYOR_APP="needsdb")
    assert relay.returncode == 2 and "the relay" in relay.stderr
