"""Three ``conveyor scheduler`` replicas, one SIGKILLed mid-run: every fire of a one-second schedule runs once.

Topology as deployed: three schedulers, one relay, one worker, on RabbitMQ and
PostgreSQL. The job (``schedapp``) writes a ledger row inside its transaction,
identified by its scheduled fire time (``n`` = the fire's epoch second). The
replica that claimed the latest fire is killed with SIGKILL just as the next fire falls due (when
the replicas race to claim it); the other two go on.
Every fire second from the first claim to the last must have run exactly once
(a missing second is lost, a second run of one is doubled), and after the kill
the effects must keep coming at the schedule's pace.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path

import databases
import ledger
import sqlalchemy as sa
from cli import Process
from conveyor.testing import unique

from event_store.database import normalize_url

APP = """
import os
import time
from datetime import datetime, timedelta

import sqlalchemy as sa

from conveyor import Context, every


@every(timedelta(seconds=1), name=os.environ["FAULT_SCHEDULE"], misfire="all", overlap="allow")
async def tick(ctx: Context) -> None:
    fire_time = ctx.message.json()["fire_time"]
    async with ctx.transaction() as tx:
        await tx.session.execute(
            sa.text("INSERT INTO ledger (message_id, n, pid, at) VALUES (:id, :n, :pid, :at)"),
            {"id": fire_time, "n": int(datetime.fromisoformat(fire_time).timestamp()), "pid": os.getpid(),
             "at": time.time()},
        )
"""
REPLICAS = 3
BEFORE, AFTER = 5, 8
"""Fires run before the kill, and after it."""
LIMIT_S = 4.0
"""Longest time without a fire's effect after the kill. Claims hold no lease: a claim is a unique row
inserted in a transaction with the job's outbox message, and PostgreSQL aborts the killed replica's open
transaction as soon as its socket closes, so nothing waits for an expiry. A surviving replica ticks at
least every ``max_sleep`` (1 s) and claims what is due, so fires keep their one-second cadence; the job
then crosses the relay (woken by NOTIFY, else its 1 s ``poll_interval``) and the worker: 1 s cadence +
1 s tick + 1 s relay poll + 1 s of scheduling noise on a loaded 2-core machine."""


def query(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = sa.create_engine(normalize_url(url, sync=True))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def wait_until(condition: object, timeout: float, what: str, processes: list[Process]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        for process in processes:
            assert process.popen.poll() is None, f"a process died:\n{process.text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_scheduler_killed_mid_run_every_fire_runs_once(postgres_url: str, rabbit_url: str, tmp_path: Path) -> None:
    url = databases.create("postgres")
    ledger.create_ledger(url)
    name = unique("schedkill")
    (tmp_path / "schedapp.py").write_text(APP)
    env = {
        "CONVEYOR_DATABASE_URL": url, "CONVEYOR_BROKER_URL": rabbit_url, "CONVEYOR_APP": "schedapp",
        "CONVEYOR_APP_DIR": str(tmp_path), "CONVEYOR_HTTP_PORT": "0", "FAULT_SCHEDULE": name,
    }  # fmt: skip
    pipeline = [Process([command], tmp_path / f"{command}.log", cwd=tmp_path, **env) for command in ("worker", "relay")]
    schedulers = [Process(["scheduler"], tmp_path / f"scheduler{i}.log", cwd=tmp_path, **env) for i in range(REPLICAS)]
    claims = "SELECT fire_time, claimed_by FROM schedule_claims WHERE schedule = :name ORDER BY fire_time"
    effects = "SELECT count(*) FROM ledger"
    try:
        wait_until(lambda: query(url, effects)[0][0] >= BEFORE, 60, f"{BEFORE} fires", pipeline + schedulers)
        latest = str(query(url, claims, name=name)[-1][1])
        victim = next(s for s in schedulers if latest.endswith(f":{s.popen.pid}"))
        time.sleep(math.ceil(time.time()) - time.time() + 0.003)  # mid-run: as the next fire falls due
        victim.popen.kill()
        victim.popen.wait()
        killed = time.time()
        survivors = [s for s in schedulers if s is not victim]
        wait_until(lambda: query(url, effects)[0][0] >= BEFORE + AFTER, 60, f"{AFTER} more fires", pipeline + survivors)
        for process in survivors:
            assert process.terminate() == 0, process.text()
        wait_until(
            lambda: query(url, effects)[0][0] >= len(query(url, claims, name=name)), 30, "the last jobs", pipeline
        )
        time.sleep(0.5)  # a late second run would land now
        for process in pipeline:
            assert process.terminate() == 0, process.text()
        claimed = query(url, claims, name=name)
        rows = ledger.effects(url)
    finally:
        for process in pipeline + schedulers:
            process.close()
        databases.drop(url)
    fires = [int(_utc(value).timestamp()) for value, _ in claimed]
    window = range(fires[0], fires[-1] + 1)
    tally = ledger.tally(rows, window)
    result = ledger.report(
        ledger.Result(
            scenario="scheduler kill -9 (3 replicas, 1 s cron)", broker="rabbit", load=len(window), faults=1,
            bad_inputs=0, lost=tally.lost, doubled=tally.doubled,
            stalled_s=ledger.longest_stall([r for r in rows if r[0] in window], since=killed), limit_s=LIMIT_S,
        )
    )  # fmt: skip
    assert len(set(fires)) == len(fires), f"a fire was claimed twice: {fires}"
    assert {n for n, _ in rows} <= set(window), "a job ran for a fire that was never claimed"
    assert len({by for _, by in claimed}) >= 2, "the replicas did not actually race"
    assert result.ok, result


def _utc(value: object) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
