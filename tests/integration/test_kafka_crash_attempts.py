"""Kafka attempts that a crash cut short are counted; graceful handovers count none.

Crashes are real: a worker subprocess is SIGKILLed by its handler when it
runs the poison record (as a segfault or an OOM kill would end it), so no
commit, no LeaveGroup and no handover mark happen. Every run of a handler is
written to a ledger file first, so the test sees runs the crash interrupted.

What the design guarantees (see :mod:`conveyor.transports.kafka_attempts`):
a record that kills its worker every time runs at most ``max_attempts + 1``
times (the first crash happens while a whole batch is out, so it is not
blamed on any record) and is then dead-lettered as ``TooManyDeliveries``;
the other records handed out with it are neither lost nor charged: they are
re-run (at-least-once) with attempt 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from conveyor import Context, envelope, on, ports, registry, transports
from conveyor.runtime import dead_letters
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique, wait_for

ONE_PARTITION = "?partitions=1&session_timeout_ms=2000&heartbeat_interval_ms=400"
TIMEOUT = 60.0

WORKER = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from conveyor import Context, on, registry, transports
    from conveyor.runtime.worker import Worker

    url, topic, name, ledger = sys.argv[1:5]
    concurrency, crash_after, work = (sys.argv[5:8] if len(sys.argv) > 5 else ("4", "0", "0.2"))

    @on(topic, name=name, max_attempts=2, concurrency=int(concurrency))
    async def handle(payload: dict, ctx: Context) -> None:
        with open(ledger, "a") as out:
            out.write(json.dumps({"n": payload["n"], "attempt": ctx.message.attempt}) + "\\n")
        if payload.get("poison"):
            await asyncio.sleep(float(crash_after))
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(float(work))

    async def main() -> None:
        transport = transports.create(url)
        await transport.connect()
        await Worker(registry.Registry.of(handle).handlers, transport, source="t").start()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def runs(ledger: Path) -> list[tuple[int, int]]:
    """(n, attempt) of every handler run so far."""
    if not ledger.exists():
        return []
    return [(r["n"], r["attempt"]) for r in map(json.loads, ledger.read_text().splitlines())]


async def open_transport(url: str) -> ports.Transport:
    transport = transports.create(url)
    await transport.connect()
    return transport


async def dead_lettered(url: str, topic: str) -> list[dead_letters.DeadLetter]:
    peeker = await open_transport(url)
    try:
        return await dead_letters.peek(peeker, topic, idle=1.0)
    finally:
        await peeker.close()


async def crash_until_dead_lettered(
    url: str, tmp_path: Path, records: int, poison: int, worker_args: tuple[str, ...] = ()
) -> tuple[list[tuple[int, int]], list[dead_letters.DeadLetter]]:
    """Publish ``records`` (``poison`` kills its worker), run worker lives until it is dead-lettered (at most 6).

    Returns:
        Every handler run, (n, attempt), and the dead letters.
    """
    topic, name, ledger = unique("crash"), unique("crash"), tmp_path / "ledger.jsonl"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    publisher = await open_transport(url)
    await publisher.declare([topic], [])
    wires = []
    for n in range(records):
        data = {"n": n, "poison": n == poison}
        event = envelope.create(topic, data, source="t", key=f"k{n % 50}")
        wires.append((topic, envelope.to_binary(event, "ce_")))
    assert not any(await publisher.publish_many(wires))
    await publisher.close()
    letters: list[dead_letters.DeadLetter] = []
    for _life in range(6):
        args = (sys.executable, str(script), url, topic, name, str(ledger), *worker_args)
        worker = await asyncio.create_subprocess_exec(*args)
        try:
            while worker.returncode is None and not letters:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.wait(), 0.5)
                if {n for n, _ in runs(ledger)} == set(range(records)):
                    letters = await dead_lettered(url, topic)
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGKILL)
            await worker.wait()
        if letters:
            break
    return runs(ledger), letters


async def test_a_record_that_kills_its_worker_is_dead_lettered_and_its_batch_is_handled_once_more(
    kafka_url: str, tmp_path: Path
) -> None:
    url = brokers.with_query(kafka_url, ONE_PARTITION)
    # One partition; the worker takes 8 (prefetch) at once, the poison among them.
    ran, letters = await crash_until_dead_lettered(url, tmp_path, records=10, poison=3)
    innocent = [(n, a) for n, a in ran if n != 3]
    assert [a for n, a in ran if n == 3] == [1, 1, 2]  # max_attempts + 1 runs
    assert {n for n, _ in innocent} == set(range(10)) - {3}  # none lost
    assert {a for _, a in innocent} == {1}  # none charged for the poison's crashes
    assert [(d.error_type, d.attempts) for d in letters] == [("TooManyDeliveries", "3")]


async def test_a_record_that_kills_its_worker_far_below_the_mark_is_dead_lettered(
    kafka_url: str, tmp_path: Path
) -> None:
    # The poison takes 3 s to crash while 1,500 later records of other keys run and settle
    # (its offset holds the commit back): when it is recovered, the mark lies more than
    # 1,023 offsets above it, farther than the mark's first layout could count a try.
    url = brokers.with_query(kafka_url, ONE_PARTITION)
    ran, letters = await crash_until_dead_lettered(url, tmp_path, records=1600, poison=3, worker_args=("64", "3", "0"))
    assert [a for n, a in ran if n == 3] == [1, 1, 2]  # max_attempts + 1 runs
    assert {n for n, _ in ran} == set(range(1600))
    assert [(d.error_type, d.attempts) for d in letters] == [("TooManyDeliveries", "3")]


async def test_a_record_that_kills_its_worker_on_one_of_four_partitions_is_dead_lettered(
    kafka_url: str, tmp_path: Path
) -> None:
    # Every partition had records out at the first crash: all four are recovered, one record at a time.
    url = brokers.with_query(kafka_url, "?partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400")
    ran, letters = await crash_until_dead_lettered(url, tmp_path, records=40, poison=3)
    assert [a for n, a in ran if n == 3] == [1, 1, 2]  # max_attempts + 1 runs
    assert {n for n, _ in ran} == set(range(40))
    assert {a for n, a in ran if n != 3} == {1}
    assert [(d.error_type, d.attempts) for d in letters] == [("TooManyDeliveries", "3")]


async def test_records_after_a_clean_stop_and_restart_have_attempt_one(
    kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = brokers.with_query(kafka_url, ONE_PARTITION)
    topic = unique("clean")
    seen: list[tuple[int, int]] = []

    @on(topic, name=unique("clean"), concurrency=2)
    async def handle(payload: dict, ctx: Context) -> None:
        seen.append((payload["n"], ctx.message.attempt))
        await asyncio.sleep(0.05)

    publisher = await open_transport(url)
    await publisher.declare([topic], [])
    for n in range(30):
        await publisher.publish(topic, envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), "ce_"))
    await publisher.close()
    caplog.set_level(logging.INFO, "conveyor.transports.kafka")
    for life in range(2):
        transport = await open_transport(url)
        worker = Worker(registry.Registry.of(handle).handlers, transport, source="t")
        await worker.start()
        if life == 0:
            await wait_for(lambda: len(seen) >= 5, TIMEOUT, "the first records")
        else:
            await wait_for(lambda: {n for n, _ in seen} == set(range(30)), TIMEOUT, "every record")
        assert await worker.stop(10)  # everything in flight finishes: a clean handover
        await transport.close()
    assert {a for _, a in seen} == {1}
    assert "stopped with records" not in caplog.text  # the second life did not recover anything


async def test_a_rebalance_between_two_members_counts_no_attempts(
    kafka_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = brokers.with_query(kafka_url, "?partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400")
    topic = unique("rebalance")
    seen: list[tuple[int, int]] = []

    @on(topic, name=unique("rebalance"), concurrency=4)
    async def handle(payload: dict, ctx: Context) -> None:
        seen.append((payload["n"], ctx.message.attempt))
        await asyncio.sleep(0.02)

    caplog.set_level(logging.INFO, "conveyor.transports.kafka")
    first, second = await open_transport(url), await open_transport(url)
    one = Worker(registry.Registry.of(handle).handlers, first, source="t")
    await one.start()
    for n in range(200):
        data, key = {"n": n}, f"k{n % 16}"
        wire = envelope.to_binary(envelope.create(topic, data, source="t", key=key), "ce_")
        await first.publish(topic, wire)
    await wait_for(lambda: len(seen) >= 20, TIMEOUT, "the first member at work")
    two = Worker(registry.Registry.of(handle).handlers, second, source="t")
    await two.start()  # the group rebalances while the first member is busy
    await wait_for(lambda: {n for n, _ in seen} == set(range(200)), TIMEOUT, "every record")
    assert await one.stop(10) and await two.stop(10)
    await first.close()
    await second.close()
    assert {a for _, a in seen} == {1}
    assert "stopped with records" not in caplog.text
