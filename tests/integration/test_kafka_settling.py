"""Settling Kafka deliveries around a revocation and around failed commits.

A broker cannot be made to revoke a partition, or fail a commit, at an exact
moment, so these tests drive :class:`~conveyor.transports.kafka_consume.KafkaConsumer`
with a stand-in for ``AIOKafkaConsumer`` and call its rebalance listener
method (``revoked``) directly, as aiokafka does before the group rejoins.
The two-member rebalance on a real broker is in ``test_kafka_rebalance.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka import errors as kafka_errors
from conveyor import envelope, errors, on, ports, registry, transports
from conveyor.envelope import WireMessage
from conveyor.runtime import dispatch, handling
from conveyor.testing import Collector, wait_for
from conveyor.transports import kafka_consume, kafka_delivery
from conveyor.transports.kafka_marks import Mark

TOPIC = "t"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
GRACE = 0.2
TIMEOUT = 5.0

Callback = Callable[[ports.Delivery], Awaitable[None]]


class FakeKafka:
    """A stand-in for ``AIOKafkaConsumer``: serves records put in ``records``, records commits.

    Attributes:
        records: the log of each partition (records are served from its position on, in order).
        commits: the offsets of every commit call, in order.
        commit_gate: when set, each commit waits for it first.
        commit_errors: raised by the next commit calls, one each (``None``: succeed).
        paused: partitions not served.
    """

    def __init__(self) -> None:
        self.records: dict[TopicPartition, list[SimpleNamespace]] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_gate: asyncio.Event | None = None
        self.commit_errors: list[BaseException | None] = []
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[object] = set()
        self._coordinator = SimpleNamespace(generation=3)  # the group generation aiokafka's coordinator knows

    def add(self, tp: TopicPartition, offset: int, body: bytes) -> None:
        record = SimpleNamespace(
            topic=tp.topic, partition=tp.partition, offset=offset, key=None, value=body, headers=()
        )
        self.records.setdefault(tp, []).append(record)

    async def getmany(
        self, *partitions: object, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[SimpleNamespace]]:
        await asyncio.sleep(0.005)  # a fetch round trip
        room = max_records if max_records is not None else 1 << 30
        batch: dict[TopicPartition, list[SimpleNamespace]] = {}
        for tp, log in self.records.items():
            if tp in self.paused or (partitions and tp not in partitions) or room <= 0:
                continue
            position = self.positions.get(tp, 0)
            served = [r for r in log if r.offset >= position][:room]
            if served:
                batch[tp] = served
                room -= len(served)
                self.positions[tp] = served[-1].offset + 1
        return batch

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.positions.get(tp, 0)

    def highwater(self, tp: TopicPartition) -> int | None:
        log = self.records.get(tp)
        return log[-1].offset + 1 if log else None

    def pause(self, *partitions: object) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: object) -> None:
        self.paused.difference_update(partitions)

    async def stop(self) -> None: ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if self.commit_errors and (error := self.commit_errors.pop(0)) is not None:
            raise error


async def refuse(*args: object) -> None:
    raise AssertionError("not expected in this test")


class Running:
    """A :class:`KafkaConsumer` on a :class:`FakeKafka`, with its fetch loop running."""

    def __init__(
        self, callback: Callback, send: kafka_consume.Send = refuse, marks: object = None, prefetch: int = 64
    ) -> None:
        self.kafka = FakeKafka()
        self.consumer = kafka_consume.KafkaConsumer(
            self.kafka,  # type: ignore[arg-type]
            ports.Subscription("s", TOPIC, prefetch=prefetch),
            "_conveyor.retry.s",
            callback,
            send,
            1.0,
            refuse,
            revoke_grace=GRACE,
            marks=marks,  # type: ignore[arg-type]
        )

    async def __aenter__(self) -> Running:
        await self.consumer.assigned({TP0, TP1})
        self.consumer._task = asyncio.get_running_loop().create_task(self.consumer._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        task = self.consumer._task
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def first_delivery(run: Running, collector: Collector, tp: TopicPartition = TP0) -> ports.Delivery:
    run.kafka.add(tp, 0, b"r0")
    (got,) = await collector.wait(1, TIMEOUT)
    return got.delivery


async def keep(delivery: ports.Delivery) -> None:
    """Leave deliveries unsettled."""


# -- revocation ----------------------------------------------------------------


async def test_nack_after_its_partition_was_revoked_publishes_no_retry_copy() -> None:
    sent: list[WireMessage] = []

    async def send(topic: str, message: WireMessage, extra: dict[str, str]) -> None:
        sent.append(message)

    collector = Collector(settle=keep)
    async with Running(collector, send) as run:
        delivery = await first_delivery(run, collector)
        await run.consumer.revoked({TP0, TP1})
        with contextlib.suppress(errors.TransportError):
            await delivery.nack(0.0)
    assert sent == []


async def test_ack_after_its_partition_was_revoked_commits_nothing() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        delivery = await first_delivery(run, collector)
        await run.consumer.revoked({TP0, TP1})
        with contextlib.suppress(errors.TransportError):
            await delivery.ack()
    assert run.kafka.commits == []


async def test_revoke_waits_for_an_in_flight_delivery_and_commits_it() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        delivery = await first_delivery(run, collector)
        revoke = asyncio.get_running_loop().create_task(run.consumer.revoked({TP0, TP1}))
        await asyncio.sleep(0)  # one loop turn: the revocation starts and stops dispatch
        await delivery.ack()
        await asyncio.wait_for(revoke, TIMEOUT)
    assert run.kafka.commits == [{TP0: 1}]


async def test_revoke_gives_up_on_an_unsettled_delivery_after_the_grace() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        await first_delivery(run, collector)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(run.consumer.revoked({TP0, TP1}), TIMEOUT)
        took = asyncio.get_running_loop().time() - started
    assert GRACE * 0.9 <= took < GRACE + 1.0


async def test_record_waiting_to_be_handed_out_when_its_partition_is_revoked_is_dropped() -> None:
    gate = asyncio.Event()
    accepted: list[bytes] = []
    calls = 0

    async def full_after_one(delivery: ports.Delivery) -> None:
        # Like a full dispatcher: the second delivery waits for room before it is accepted.
        nonlocal calls
        calls += 1
        if calls == 2:
            await gate.wait()
        accepted.append(delivery.message.body)

    async with Running(full_after_one) as run:
        run.kafka.add(TP0, 0, b"r0")
        run.kafka.add(TP0, 1, b"r1")
        await wait_for(lambda: calls == 2, TIMEOUT, "the second hand-out")
        await run.consumer.revoked({TP0})
        gate.set()
        run.kafka.add(TP1, 0, b"other partition")
        await wait_for(lambda: b"other partition" in accepted, TIMEOUT, "the record of the kept partition")
    assert accepted == [b"r0", b"other partition"]


async def test_record_held_for_a_retry_is_not_handed_out_after_its_partition_was_revoked() -> None:
    async def unreachable(topic: str, message: WireMessage, extra: dict[str, str]) -> None:
        raise errors.TransientTransportError("broker away")  # the copy is held in memory instead

    collector = Collector(settle=keep)
    async with Running(collector, unreachable) as run:
        delivery = await first_delivery(run, collector)
        await delivery.nack(0.0)  # due at once: the fetch loop hands a held copy out before fetching
        await run.consumer.revoked({TP0})
        run.kafka.add(TP1, 0, b"later")
        await wait_for(lambda: b"later" in collector.bodies(), TIMEOUT, "a later record")
    assert collector.bodies() == [b"r0", b"later"]


# -- commits in the background ------------------------------------------------------


async def test_ack_returns_while_the_commit_of_its_offset_is_blocked() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        run.kafka.commit_gate = asyncio.Event()  # never set: every commit hangs
        run.kafka.add(TP0, 0, b"r0")
        run.kafka.add(TP0, 1, b"r1")
        first, second = (r.delivery for r in await collector.wait(2, TIMEOUT))
        async with asyncio.timeout(TIMEOUT):
            await first.ack()
            await wait_for(lambda: len(run.kafka.commits) == 1, TIMEOUT, "the first commit to start")
            await second.ack()
        run.kafka.commit_gate.set()


async def test_close_after_acks_commits_their_offsets_once_the_blocked_commit_ends() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        run.kafka.commit_gate = asyncio.Event()
        for offset in range(3):
            run.kafka.add(TP0, offset, f"r{offset}".encode())
        deliveries = [r.delivery for r in await collector.wait(3, TIMEOUT)]
        for delivery in deliveries:
            await delivery.ack()
        closing = asyncio.get_running_loop().create_task(run.consumer.close())
        await wait_for(lambda: len(run.kafka.commits) >= 1, TIMEOUT, "a commit to start")
        run.kafka.commit_gate.set()
        await asyncio.wait_for(closing, TIMEOUT)
    assert run.kafka.commits[-1] == {TP0: 3}


async def test_offset_acked_during_a_commit_is_committed_by_the_next_round() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        run.kafka.add(TP0, 0, b"r0")
        run.kafka.add(TP0, 1, b"r1")
        first, second = (r.delivery for r in await collector.wait(2, TIMEOUT))
        run.kafka.commit_gate = asyncio.Event()
        await first.ack()
        await wait_for(lambda: len(run.kafka.commits) == 1, TIMEOUT, "the first commit round")
        await second.ack()
        run.kafka.commit_gate.set()
        await wait_for(lambda: len(run.kafka.commits) == 2, TIMEOUT, "the second commit round")
    assert run.kafka.commits == [{TP0: 1}, {TP0: 2}]


@pytest.mark.parametrize("error", [kafka_errors.KafkaError("commit refused"), RuntimeError("a bug in the client")])
async def test_failed_commit_is_retried_in_the_background_and_the_ack_returns(error: Exception) -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        delivery = await first_delivery(run, collector)
        run.kafka.commit_errors = [error]
        async with asyncio.timeout(TIMEOUT):
            await delivery.ack()
        await wait_for(lambda: len(run.kafka.commits) == 2, TIMEOUT, "the commit to be retried")
    assert run.kafka.commits == [{TP0: 1}, {TP0: 1}]


async def test_offsets_acked_during_a_failing_commit_are_committed_with_its_retry() -> None:
    collector = Collector(settle=keep)
    async with Running(collector) as run:
        run.kafka.add(TP0, 0, b"r0")
        run.kafka.add(TP0, 1, b"r1")
        first, second = (r.delivery for r in await collector.wait(2, TIMEOUT))
        run.kafka.commit_gate = asyncio.Event()
        run.kafka.commit_errors = [kafka_errors.KafkaError("commit refused")]
        await first.ack()
        await wait_for(lambda: len(run.kafka.commits) == 1, TIMEOUT, "the first commit round")
        await second.ack()
        run.kafka.commit_gate.set()
        await wait_for(lambda: run.kafka.commits[-1] == {TP0: 2}, TIMEOUT, "offset 2 to be committed")
    assert run.kafka.commits == [{TP0: 1}, {TP0: 2}]


# -- deliveries queued in the runtime when their partition is revoked ---------------


async def test_deliveries_queued_in_a_key_lane_never_run_after_their_partition_was_revoked() -> None:
    ran: list[int] = []
    release = asyncio.Event()

    @on(TOPIC, name="s", concurrency=4)
    async def slow(payload: dict) -> None:
        ran.append(payload["n"])
        await release.wait()  # the first blocks the key's lane; the others wait in it

    memory = transports.create("memory://lanes")
    await memory.connect()
    (handler,) = registry.Registry.of(slow).handlers
    runner = handling.HandlerRunner(handler, memory, source="t", max_message_bytes=1 << 20)
    dispatcher = dispatch.Dispatcher(runner.process, concurrency=4)
    async with Running(dispatcher.submit) as run:
        for n in range(5):
            wire = envelope.to_binary(envelope.create(TOPIC, {"n": n}, source="t", key="k"), envelope.KAFKA_PREFIX)
            headers = kafka_delivery.record_headers(wire)
            run.kafka.records.setdefault(TP0, []).append(
                SimpleNamespace(topic=TOPIC, partition=0, offset=n, key=b"k", value=wire.body, headers=headers)
            )
        await wait_for(lambda: ran == [0] and dispatcher.in_flight == 5, TIMEOUT, "a lane of five")
        await run.consumer.revoked({TP0, TP1})  # the first is still running after the grace
        release.set()
        assert await dispatcher.drain(TIMEOUT)
        assert (ran, run.consumer._unsettled, run.kafka.commits) == ([0], 0, [])
    await memory.close()


# -- attempt marks ------------------------------------------------------------------


class FailingMarks:
    """A stand-in for ``MarkStore`` whose first write fails; logs writes and deliveries in ``events``."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.failures = 1

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, tps: object) -> dict[TopicPartition, tuple[int | None, Mark]]:
        return {}

    async def save(self, marks: dict[TopicPartition, Mark]) -> None:
        if marks and self.failures:
            self.failures -= 1
            self.events.append("mark failed")
            raise errors.TransientTransportError("mark write failed")
        self.events.extend(f"marked {tp.partition}:{mark.through}" for tp, mark in marks.items())


async def test_records_are_handed_out_only_after_their_mark_was_written() -> None:
    events: list[str] = []

    async def log(delivery: ports.Delivery) -> None:
        events.append(delivery.message.body.decode())
        await delivery.ack()

    async with Running(log, marks=FailingMarks(events)) as run:
        for offset in range(3):
            run.kafka.add(TP0, offset, f"r{offset}".encode())
        await wait_for(lambda: len(events) >= 5, TIMEOUT, "the records")
    assert events == ["mark failed", "marked 0:130", "r0", "r1", "r2"]  # 128 past the records


async def test_mark_of_a_large_prefetch_reaches_at_most_128_records_past_those_handed_out() -> None:
    # What a crash leaves to recover one record at a time: the records out, and the lookahead.
    events: list[str] = []

    async def log(delivery: ports.Delivery) -> None:
        events.append(delivery.message.body.decode())
        await delivery.ack()

    marks = FailingMarks(events)
    marks.failures = 0
    async with Running(log, marks=marks, prefetch=1000) as run:
        for offset in range(10):
            run.kafka.add(TP0, offset, f"r{offset}".encode())
        await wait_for(lambda: len(events) >= 11, TIMEOUT, "the records")
    assert events[0] == "marked 0:137"


class SlowMarks(FailingMarks):
    """Marks whose first write is held until ``gate`` opens; later ones land at once (another connection)."""

    def __init__(self, events: list[str], gate: asyncio.Event) -> None:
        super().__init__(events)
        self.failures = 0
        self.gate = gate
        self.writing = asyncio.Event()

    async def save(self, marks: dict[TopicPartition, Mark]) -> None:
        if not self.writing.is_set():
            self.writing.set()
            await self.gate.wait()
        await super().save(marks)


async def test_revocation_waits_for_a_mark_write_in_flight_so_no_stale_mark_lands_after_it() -> None:
    events: list[str] = []
    gate = asyncio.Event()
    marks = SlowMarks(events, gate)

    async def revoke(run: Running) -> None:
        await run.consumer.revoked({TP0, TP1})
        events.append("revoked")

    async with Running(keep, marks=marks) as run:
        run.kafka.add(TP0, 0, b"r0")
        await asyncio.wait_for(marks.writing.wait(), TIMEOUT)  # the fetch loop's mark write is in flight
        revoking = asyncio.get_running_loop().create_task(revoke(run))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(revoking, TIMEOUT)
    # The handover marks (nothing started: clean) land after the write in flight, before the revocation ends.
    assert events[0] == "marked 0:128" and events[-1] == "revoked"
    assert sorted(events[1:3]) == ["marked 0:-1", "marked 1:-1"]


async def test_member_whose_generation_was_reset_writes_no_marks_and_hands_nothing_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its session expired (aiokafka resets the generation to -1): the partitions may be another
    # member's already, whose marks a write from here would overwrite.
    events: list[str] = []
    marks = FailingMarks(events)
    marks.failures = 0
    async with Running(keep, marks=marks) as run:
        run.kafka._coordinator.generation = -1
        run.kafka.add(TP0, 0, b"r0")
        await wait_for(lambda: "generation changed" in caplog.text, TIMEOUT, "the refused mark write")
        await run.consumer.revoked({TP0, TP1})
    assert events == []


class RecoveringMarks(FailingMarks):
    """Marks saying the previous owner of ``TP0`` died with offsets 0..5 in hand; ``TP1`` was left clean."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(events)
        self.failures = 0

    async def load(self, tps: object) -> dict[TopicPartition, tuple[int | None, Mark]]:
        return {TP0: (0, Mark(5)), TP1: (0, Mark())}


async def test_partition_recovering_after_a_crash_holds_back_no_other_partition() -> None:
    out: list[ports.Delivery] = []

    async def handle(delivery: ports.Delivery) -> None:
        out.append(delivery)
        if delivery.message.body.startswith(b"p1"):
            await delivery.ack()  # p0's recovered record stays out: a slow handler

    events: list[str] = []
    async with Running(handle, marks=RecoveringMarks(events)) as run:
        for offset in range(2):
            run.kafka.add(TP0, offset, f"p0-{offset}".encode())
        for offset in range(3):
            run.kafka.add(TP1, offset, f"p1-{offset}".encode())
        await wait_for(lambda: len(out) >= 4, TIMEOUT, "the recovered record and the other partition's")
        bodies = sorted(d.message.body for d in out)
    assert bodies == [b"p0-0", b"p1-0", b"p1-1", b"p1-2"]  # p0 one at a time, p1 meanwhile
    assert [d.attempt for d in out if d.message.body == b"p0-0"] == [1]
    assert "marked 0:5" in events  # p0-0's attempt counted before it ran
