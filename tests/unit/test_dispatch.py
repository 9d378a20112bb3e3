"""The dispatcher: bounded in-flight work, per-key order, concurrency across keys, drain."""

import asyncio

from conveyor.envelope import WireMessage
from conveyor.runtime.dispatch import Dispatcher
from conveyor.testing import remains, wait_for


class FakeDelivery:
    def __init__(self, body: str, key: str | None = None) -> None:
        self.topic = "t"
        self.message = WireMessage(body.encode(), key=key)
        self.attempt = 1

    async def ack(self) -> None: ...

    async def nack(self, delay: float) -> None: ...


async def test_submit_waits_when_concurrency_plus_buffer_are_taken() -> None:
    release = asyncio.Event()

    async def process(delivery: object) -> None:
        await release.wait()

    dispatcher = Dispatcher(process, concurrency=2, buffer=1)
    for i in range(3):
        await dispatcher.submit(FakeDelivery(str(i)))
    blocked = asyncio.ensure_future(dispatcher.submit(FakeDelivery("4")))
    # A negative check, so a short window: a submit that did not wait would finish
    # within a loop iteration or two.
    await remains(lambda: not blocked.done(), 0.05, "the fourth submit waiting")
    release.set()
    await asyncio.wait_for(blocked, 1)
    assert await dispatcher.drain(1)


async def test_same_key_runs_in_order_and_keys_run_concurrently() -> None:
    order: list[str] = []
    running = [0, 0]

    async def process(delivery: FakeDelivery) -> None:
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(0.001 * (hash(delivery.message.body) % 5))
        order.append(delivery.message.body.decode())
        running[0] -= 1

    dispatcher = Dispatcher(process, concurrency=4)  # type: ignore[arg-type]
    for n in range(20):
        for key in "abc":
            await dispatcher.submit(FakeDelivery(f"{key}{n}", key=key))
    assert await dispatcher.drain(5)
    for key in "abc":
        assert [x for x in order if x[0] == key] == [f"{key}{n}" for n in range(20)]
    assert running[1] > 1


async def test_drain_deadline_cancels_unfinished_work() -> None:
    finished: list[str] = []

    async def process(delivery: FakeDelivery) -> None:
        await asyncio.sleep(0.01 if delivery.message.body == b"fast" else 30)
        finished.append(delivery.message.body.decode())

    dispatcher = Dispatcher(process, concurrency=4)  # type: ignore[arg-type]
    await dispatcher.submit(FakeDelivery("fast"))
    await dispatcher.submit(FakeDelivery("slow"))
    await wait_for(lambda: finished == ["fast"], 2)
    assert not await dispatcher.drain(0.1)
    assert finished == ["fast"] and dispatcher.in_flight == 0


async def test_no_more_than_concurrency_deliveries_run_at_once() -> None:
    running = [0, 0]  # now, most ever
    release = asyncio.Event()

    async def process(delivery: FakeDelivery) -> None:
        running[0] += 1
        running[1] = max(running)
        await release.wait()
        running[0] -= 1

    dispatcher = Dispatcher(process, concurrency=3, buffer=20)  # type: ignore[arg-type]
    for n in range(12):
        await dispatcher.submit(FakeDelivery(str(n)))  # keyless: nothing orders them but the cap
    await wait_for(lambda: running[0] == 3, 2, "three running")
    # A negative check, so a short window: a fourth delivery would start at once, were the cap broken.
    await remains(lambda: running[0] <= 3, 0.05, "at most three running")
    release.set()
    assert await dispatcher.drain(2)
    assert running[1] == 3


async def test_a_process_that_raises_costs_no_capacity() -> None:
    done: list[str] = []

    async def process(delivery: FakeDelivery) -> None:
        if delivery.message.body.startswith(b"bad"):
            raise RuntimeError("a bug in processing")
        done.append(delivery.message.body.decode())

    dispatcher = Dispatcher(process, concurrency=2, buffer=0)  # type: ignore[arg-type]
    for i in range(4):
        await dispatcher.submit(FakeDelivery(f"bad{i}", key="k" if i % 2 else None))
    for i in range(6):
        await dispatcher.submit(FakeDelivery(f"ok{i}", key="k" if i % 2 else None))
    await wait_for(lambda: len(done) == 6, 2, "the good deliveries after the failing ones")
    assert dispatcher.in_flight == 0
    assert await dispatcher.drain(1)


async def test_work_submitted_after_a_drain_runs() -> None:
    done: list[str] = []

    async def process(delivery: FakeDelivery) -> None:
        done.append(delivery.message.body.decode())

    dispatcher = Dispatcher(process, concurrency=2)  # type: ignore[arg-type]
    await dispatcher.submit(FakeDelivery("a"))
    assert await dispatcher.drain(1)
    await dispatcher.submit(FakeDelivery("b", key="k"))
    await wait_for(lambda: done == ["a", "b"], 2, "the delivery submitted after the drain")
    assert await dispatcher.drain(1)
