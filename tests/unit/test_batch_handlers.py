"""Batch handlers: one call for many messages, each message settled on its own."""

from __future__ import annotations

import asyncio

import pydantic
import pytest
from conveyor import Reject, Retry, envelope, errors, on, ports, registry
from conveyor.runtime.probes import Check, Probes
from conveyor.runtime.worker import Worker
from conveyor.testing import Collector, remains, unique, wait_for
from conveyor.transports.memory import MemoryTransport


class Order(pydantic.BaseModel):
    n: int


async def _start(
    *handlers: object, concurrency: int = 4, database: Check | None = None
) -> tuple[MemoryTransport, Worker]:
    transport = MemoryTransport(f"memory://{unique('batch')}")
    await transport.connect()
    probes = Probes(database, transport.check, ttl=0)
    worker = Worker(
        registry.Registry.of(*handlers).handlers, transport, source="test", concurrency=concurrency, probes=probes
    )
    await worker.declare()
    return transport, worker


async def _publish(transport: MemoryTransport, topic: str, items: list[object], key: str | None = None) -> None:
    messages = [
        (topic, envelope.to_binary(envelope.create(topic, item, source="test", key=key), transport.binary_prefix))
        for item in items
    ]
    assert await transport.publish_many(messages) == [None] * len(messages)


async def _dead_letters(transport: MemoryTransport, topic: str) -> Collector:
    collector = Collector()
    sub = ports.Subscription(name=unique("dlq"), topic=topic + ".dlq")
    await transport.declare([], [sub])
    await transport.subscribe(sub, collector)
    return collector


async def test_a_batch_handler_gets_lists_of_up_to_batch_payloads_in_order() -> None:
    topic = unique("t")
    calls: list[list[int]] = []

    @on(topic, name=unique("h"), batch=10, batch_wait=0.05)
    async def handle(orders: list[Order]) -> None:
        calls.append([o.n for o in orders])

    transport, worker = await _start(handle)
    await _publish(transport, topic, [{"n": n} for n in range(35)], key="one-key")
    await worker.start()
    await wait_for(lambda: sum(map(len, calls)) == 35, 5, "35 payloads")
    assert [n for call in calls for n in call] == list(range(35))
    assert max(map(len, calls)) == 10 and len(calls) >= 4
    await worker.stop(5)
    assert transport.broker.backlog(handle.__conveyor_handler__.name).pending == 0  # type: ignore[attr-defined]


async def test_a_partial_batch_is_called_after_batch_wait() -> None:
    topic = unique("t")
    calls: list[int] = []

    @on(topic, name=unique("h"), batch=100, batch_wait=0.05)
    async def handle(orders: list[Order]) -> None:
        calls.append(len(orders))

    transport, worker = await _start(handle)
    await worker.start()
    await _publish(transport, topic, [{"n": 1}, {"n": 2}, {"n": 3}])
    await wait_for(lambda: calls == [3], 5, "one call with the three waiting payloads")
    await worker.stop(5)


async def test_each_message_is_settled_on_its_own() -> None:
    topic = unique("t")
    seen: list[int] = []

    @on(topic, name=unique("h"), batch=8, batch_wait=0.02, max_attempts=2)
    async def handle(orders: list[Order]) -> dict[int, BaseException]:
        seen.extend(o.n for o in orders)
        return {i: Reject("bad order") if o.n == 1 else RuntimeError("flaky") for i, o in enumerate(orders) if o.n < 2}

    transport, worker = await _start(handle)
    dead = await _dead_letters(transport, topic)
    await worker.start()
    await _publish(transport, topic, [{"n": n} for n in range(4)] + [b"{not json"])
    await dead.wait(3, 10)  # the poison one, the rejected one, and n=0 after its two attempts
    reasons = sorted(r.message.headers["conveyor-dlq-error-type"] for r in dead.received)
    assert reasons == ["InvalidMessage", "Rejected", "RuntimeError"]
    await remains(lambda: len(dead.received) == 3, 0.2, "nothing else dead-lettered")
    assert sorted(seen) == [0, 0, 1, 2, 3], seen  # n=0 retried once; 2 and 3 acked once; poison never called
    await worker.stop(5)


async def test_a_raising_batch_handler_fails_every_message_and_an_outage_spends_no_attempt() -> None:
    topic = unique("t")
    calls: list[list[int]] = []

    @on(topic, name=unique("h"), batch=4, batch_wait=0.02, max_attempts=3)
    async def handle(orders: list[Order]) -> None:
        calls.append([o.n for o in orders])
        if len(calls) <= 3:
            raise errors.StoreUnavailable("database down")  # not the messages' fault
        if len(calls) == 4:
            raise Retry(delay=0.01)

    async def database() -> None:  # the probe agrees: the database is down while the handler says so
        if len(calls) <= 3:
            raise errors.StoreUnavailable("database down")

    transport, worker = await _start(handle, database=database)
    dead = await _dead_letters(transport, topic)
    await worker.start()
    await _publish(transport, topic, [{"n": n} for n in range(4)])
    await wait_for(lambda: len(calls) == 5, 15, "three held calls, one retry, one success")
    assert calls == [[0, 1, 2, 3]] * 5
    await remains(lambda: not dead.received, 0.2, "no dead letters")
    await worker.stop(5)


@pytest.mark.parametrize(
    ("options", "signature", "text"),
    [
        ({"batch": 0}, "list", "between 1 and"),
        ({"batch": 5, "transactional": True}, "list", "not transactional"),
        ({"batch": 5, "concurrency": 2}, "list", "leave concurrency unset"),
        ({"batch": 5}, "single", r"annotated list\[X\]"),
    ],
)
def test_batch_options_are_checked_at_registration(options: dict[str, object], signature: str, text: str) -> None:
    if signature == "list":

        async def func(orders: list[Order]) -> None: ...
    else:

        async def func(orders: Order) -> None: ...  # type: ignore[misc]

    with pytest.raises(errors.ConfigurationError, match=text):
        on(unique("t"), **options)(func)  # type: ignore[arg-type]


async def test_a_batch_stuck_past_its_timeout_is_retried() -> None:
    topic = unique("t")
    calls: list[int] = []

    @on(topic, name=unique("h"), batch=2, batch_wait=0.01, timeout=0.1, max_attempts=2)
    async def handle(orders: list[Order]) -> None:
        calls.append(len(orders))
        if len(calls) == 1:
            await asyncio.sleep(10)

    transport, worker = await _start(handle)
    await worker.start()
    await _publish(transport, topic, [{"n": 1}, {"n": 2}])
    await wait_for(lambda: sum(calls) >= 4, 10, "the timed-out batch called again")
    await worker.stop(5)


def _unsettled(transport: MemoryTransport, handler: object) -> int:
    backlog = transport.broker.backlog(handler.__conveyor_handler__.name)  # type: ignore[attr-defined]
    return int(backlog.pending + backlog.in_flight)


class Picky(pydantic.BaseModel):
    """A model whose validator raises a bug's exception (pydantic wraps only ValueError and AssertionError)."""

    n: int

    @pydantic.field_validator("n")
    @classmethod
    def _not_13(cls, value: int) -> int:
        if value == 13:
            raise TypeError("a validator bug")
        return value


async def test_a_message_whose_decoding_raises_a_bug_is_dead_lettered_and_the_rest_of_its_batch_runs() -> None:
    topic = unique("t")
    calls: list[list[int]] = []

    @on(topic, name=unique("h"), batch=4, batch_wait=0.05)
    async def handle(orders: list[Picky]) -> None:
        calls.append([o.n for o in orders])

    transport, worker = await _start(handle)
    dead = await _dead_letters(transport, topic)
    await worker.start()
    await _publish(transport, topic, [{"n": 1}, {"n": 13}, {"n": 2}, {"n": 3}], key="k")
    await wait_for(lambda: len(dead.received) == 1 and calls, 5, "a dead letter and a call")
    assert calls == [[1, 2, 3]]
    assert dead.received[0].message.headers["conveyor-dlq-error-type"] == "InternalError"
    await wait_for(lambda: _unsettled(transport, handle) == 0, 5, "every message settled")
    await worker.stop(5)


async def test_a_failed_settle_of_one_message_leaves_the_rest_of_the_batch_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor.transports import memory

    original = memory.MemoryDelivery.nack
    failures = [errors.TransportError("the broker did not confirm the delayed copy")]

    async def nack_once_failing(self: memory.MemoryDelivery, delay: float) -> None:
        await original(self, 0.0)  # requeued, as RabbitMQ's reject does when its delayed copy fails
        if failures:
            raise failures.pop()

    monkeypatch.setattr(memory.MemoryDelivery, "nack", nack_once_failing)
    topic = unique("t")
    calls: list[list[int]] = []

    @on(topic, name=unique("h"), batch=4, batch_wait=0.05)
    async def handle(orders: list[Order]) -> dict[int, BaseException] | None:
        calls.append([o.n for o in orders])
        return {0: RuntimeError("flaky")} if len(calls) == 1 else None

    transport, worker = await _start(handle)
    await worker.start()
    await _publish(transport, topic, [{"n": n} for n in range(4)], key="k")
    await wait_for(lambda: _unsettled(transport, handle) == 0 and len(calls) >= 2, 5, "every message settled")
    assert calls == [[0, 1, 2, 3], [0]]
    await worker.stop(5)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot print this")


async def test_a_failure_settling_one_message_dead_letters_only_that_message() -> None:
    topic = unique("t")
    calls: list[list[int]] = []

    @on(topic, name=unique("h"), batch=3, batch_wait=0.05)
    async def handle(orders: list[Order]) -> dict[int, BaseException] | None:
        calls.append([o.n for o in orders])
        return {1: Unprintable()}

    transport, worker = await _start(handle)
    dead = await _dead_letters(transport, topic)
    await worker.start()
    await _publish(transport, topic, [{"n": n} for n in range(3)], key="k")
    await wait_for(lambda: _unsettled(transport, handle) == 0 and dead.received, 5, "every message settled")
    await asyncio.sleep(0.2)  # a wrong second or third dead letter would arrive meanwhile
    assert [orjson_n(d.message.body) for d in dead.received] == [1]
    await worker.stop(5)


def orjson_n(body: bytes) -> int:
    import orjson

    return int(orjson.loads(body)["n"])
