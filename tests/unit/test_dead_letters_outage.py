"""A broker outage while a message is being dead-lettered is not the message's fault: it spends no attempt."""

from __future__ import annotations

import asyncio
import time

from conveyor import Reject, envelope, errors, on
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport
from dlq_helpers import worker_with_dead_letters


class DeadLetterOutage(MemoryTransport):
    """A broker that takes no dead letter and fails its probe for ``seconds`` after the first try (an outage)."""

    def __init__(self, url: str, seconds: float) -> None:
        super().__init__(url)
        self.seconds = seconds
        self.until: float | None = None
        self.refused = 0

    def down(self) -> bool:
        return self.until is not None and time.monotonic() < self.until

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        if topic.endswith(".dlq"):
            if self.until is None:
                self.until = time.monotonic() + self.seconds
            if self.down():
                self.refused += 1
                raise errors.TransientTransportError(f"{topic}: the broker is unreachable (test)")
        await super().publish(topic, message)

    async def check(self) -> None:
        if self.down():  # the probe sees the outage too
            raise errors.TransientTransportError("the broker is unreachable (test)")
        await super().check()


async def test_a_dead_letter_publish_that_meets_an_outage_is_held_and_keeps_its_reason() -> None:
    topic, name = unique("dl"), unique("dl")
    runs: list[int] = []

    @on(topic, name=name, max_attempts=3)
    async def rejects(payload: dict) -> None:
        runs.append(1)
        raise Reject("not wanted")

    transport = DeadLetterOutage(f"memory://{unique('dl')}", seconds=1.5)
    await transport.connect()
    worker, dead = await worker_with_dead_letters(transport, rejects)
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": 1}, source="t"), "ce-"))
    await wait_for(lambda: bool(dead.received), 15, "the dead letter, once the broker takes it")
    await asyncio.sleep(0.2)  # a second run or dead letter would show meanwhile
    assert await worker.stop(5)
    reasons = [d.message.headers["conveyor-dlq-error-type"] for d in dead.received]
    assert transport.refused >= 2, "the outage never reached the dead letter"
    assert (len(runs), reasons, transport.broker.backlog(name).pending) == (1, ["Rejected"], 0)


async def test_a_dead_letter_publish_that_fails_while_the_broker_answers_its_probe_is_not_held() -> None:
    topic, name = unique("dl"), unique("dl")
    runs: list[int] = []

    @on(topic, name=name, max_attempts=3)
    async def rejects(payload: dict) -> None:
        runs.append(1)
        raise Reject("not wanted")

    class Flaky(DeadLetterOutage):
        async def check(self) -> None:  # the broker answers: the failure is not an outage
            await MemoryTransport.check(self)

    transport = Flaky(f"memory://{unique('dl')}", seconds=3600)
    await transport.connect()
    worker, _ = await worker_with_dead_letters(transport, rejects)
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": 1}, source="t"), "ce-"))
    await wait_for(lambda: len(runs) >= 3, 30, "the message redelivered, never held")
    assert await worker.stop(5)
    # Each run's dead letter is tried once, and once more after the probe passed: never held in place.
    assert len(runs) <= transport.refused <= 2 * len(runs)
