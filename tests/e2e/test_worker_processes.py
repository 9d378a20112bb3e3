"""Two ``conveyor worker`` OS processes sharing a handler, on each real broker: messages split, none lost or doubled.

Each process appends the ids it handled to a file of its own; the test publishes
with :class:`conveyor.Publisher` (as another service would) and reads the files.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cli import Process, free_port, migrated
from conveyor import Publisher
from conveyor.testing import unique

SHARED_APP = """
import os
from pathlib import Path

from conveyor import on


@on(os.environ["SPLIT_TOPIC"], name=os.environ["SPLIT_HANDLER"], concurrency=4)
def record(job: dict) -> None:
    with (Path(os.environ["SPLIT_DIR"]) / f"handled-{os.getpid()}.txt").open("a") as out:
        out.write(job["n"] + "\\n")
"""
COUNT = 200


def handled(directory: Path) -> dict[str, list[str]]:
    return {path.name: path.read_text().split() for path in directory.glob("handled-*.txt")}


@pytest.mark.parametrize("broker", ["rabbit", "nats", "kafka"])
def test_two_worker_processes_split_messages_without_loss_or_duplicates(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    topic, name = unique("split"), unique("split")
    (tmp_path / "splitapp.py").write_text(SHARED_APP)
    env = {
        "CONVEYOR_BROKER_URL": url, "CONVEYOR_APP": "splitapp", "CONVEYOR_APP_DIR": str(tmp_path),
        "SPLIT_TOPIC": topic, "SPLIT_HANDLER": name, "SPLIT_DIR": str(tmp_path), **migrated(tmp_path),
    }  # fmt: skip
    ports = [free_port(), free_port()]
    workers = [
        Process(["worker", "--port", str(port)], tmp_path / f"worker{i}.log", cwd=tmp_path, **env)
        for i, port in enumerate(ports)
    ]
    try:
        for worker, port in zip(workers, ports, strict=True):
            worker.wait_ready(port, timeout=60)

        async def publish() -> None:
            async with Publisher(url, source="e2e") as publisher:
                for n in range(COUNT):
                    await publisher.publish(topic, {"n": str(n)}, key=f"k{n}")

        asyncio.run(publish())
        deadline = time.monotonic() + 60
        while (total := sum(len(ids) for ids in handled(tmp_path).values())) < COUNT:
            for worker in workers:
                assert worker.popen.poll() is None, f"a worker exited:\n{worker.text()}"
            assert time.monotonic() < deadline, f"{total} of {COUNT} messages handled after 60s"
            time.sleep(0.2)
        # A negative check, so a sleep: no event marks "no duplicate is coming". A
        # redelivery would follow the original within moments; fail as soon as one lands.
        window = time.monotonic() + 0.5
        while time.monotonic() < window:
            total = sum(len(ids) for ids in handled(tmp_path).values())
            assert total == COUNT, f"{total} messages handled, {COUNT} published: a late duplicate"
            time.sleep(0.05)
        for worker in workers:
            assert worker.terminate() == 0, worker.text()
    finally:
        for worker in workers:
            worker.close()
    shares = handled(tmp_path)
    every_id = [n for ids in shares.values() for n in ids]
    assert sorted(every_id, key=int) == [str(n) for n in range(COUNT)], "lost or doubled messages"
    assert len(shares) == 2 and all(shares.values()), (
        f"both processes should get a share: {[len(v) for v in shares.values()]}"
    )
