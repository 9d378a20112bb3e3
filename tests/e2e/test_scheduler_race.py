"""Scheduler replicas as OS processes racing a one-second schedule: every fire runs exactly once, none missed.

Topology, as an operator deploys it: N ``conveyor scheduler`` processes, one
``conveyor relay`` and one ``conveyor worker``, on RabbitMQ and a shared
database. The job writes a ledger row inside ``ctx.transaction()``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import databases
import pytest
import sqlalchemy as sa
from cli import Process
from conveyor.testing import unique

from event_store.database import normalize_url

RACE_APP = """
import os
from datetime import timedelta

import sqlalchemy as sa

from conveyor import Context, every


@every(timedelta(seconds=1), name=os.environ["RACE_SCHEDULE"], misfire="all", overlap="allow")
async def tick(ctx: Context) -> None:
    async with ctx.transaction() as tx:
        await tx.session.execute(
            sa.text("INSERT INTO race_ledger (fire_time) VALUES (:fire_time)"),
            {"fire_time": ctx.message.json()["fire_time"]},
        )
"""
FIRES = 15


@pytest.fixture(params=[("postgres", 3), ("sqlite", 2)], ids=["postgres-3", "sqlite-2"])
def race_db(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    kind, replicas = request.param
    if kind == "postgres":
        request.getfixturevalue("postgres_url")
    url = databases.create(kind)
    engine = sa.create_engine(normalize_url(url, sync=True))
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE race_ledger (fire_time VARCHAR(40) NOT NULL)"))
    engine.dispose()
    yield url, replicas
    databases.drop(url)


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = sa.create_engine(normalize_url(url, sync=True))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql))]
    finally:
        engine.dispose()


def wait_until(condition: object, timeout: float, what: str, processes: list[Process]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        for process in processes:
            assert process.popen.poll() is None, f"a process died:\n{process.text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_replicas_fire_each_second_exactly_once(race_db: tuple[str, int], rabbit_url: str, tmp_path: Path) -> None:
    url, replicas = race_db
    name = unique("race")
    (tmp_path / "raceapp.py").write_text(RACE_APP)
    env = {
        "CONVEYOR_DATABASE_URL": url,
        "CONVEYOR_BROKER_URL": rabbit_url,
        "CONVEYOR_APP": "raceapp",
        "CONVEYOR_APP_DIR": str(tmp_path),
        "CONVEYOR_HTTP_PORT": "0",
        "RACE_SCHEDULE": name,
    }
    workers = [Process([command], tmp_path / f"{command}.log", cwd=tmp_path, **env) for command in ("worker", "relay")]
    schedulers = [Process(["scheduler"], tmp_path / f"scheduler{i}.log", cwd=tmp_path, **env) for i in range(replicas)]
    everyone = workers + schedulers
    ledger = "SELECT fire_time FROM race_ledger"
    claimed = f"SELECT fire_time, claimed_by, status FROM schedule_claims WHERE schedule = '{name}' ORDER BY fire_time"
    try:
        wait_until(lambda: len(query(url, ledger)) >= FIRES + 1, 90, f"{FIRES} fires", everyone)
        for process in schedulers:
            assert process.terminate() == 0, process.text()
        wait_until(
            lambda: len(query(url, ledger)) >= len(query(url, claimed)),
            30,
            f"the last jobs: claims {[(str(r[0]), r[2]) for r in query(url, claimed)]}, "
            f"ledger {sorted(query(url, ledger))}",
            workers,
        )
        for process in workers:
            assert process.terminate() == 0, process.text()
    finally:
        for process in everyone:
            process.close()
    claims = query(url, claimed)
    fires = [str(row[0])[:19] for row in claims]
    executed = sorted(str(row[0])[:19].replace("T", " ") for row in query(url, ledger))
    assert len(fires) >= FIRES and len(set(fires)) == len(fires)
    seconds = [time.mktime(time.strptime(f, "%Y-%m-%d %H:%M:%S")) for f in fires]
    assert all(b - a == 1 for a, b in itertools.pairwise(seconds)), f"missed fires: {fires}"
    assert executed == sorted(f.replace("T", " ") for f in fires), "a fire ran twice or not at all"
    assert len({row[1] for row in claims}) >= 2, "the replicas did not actually race"
