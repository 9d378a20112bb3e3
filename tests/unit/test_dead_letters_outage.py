"""A broker outage while a message is being dead-lettered is not the message's fault: it spends no attempt."""

from __future__ import annotations

import asyncio

from conveyor import Reject, envelope, errors, on
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport
from dlq_helpers import worker_with_dead_letters


class DeadLetterOutage(MemoryTransport):
    """A broker that cannot take the first ``failures`` dead letters (an outage, not a refusal)."""

    def __init__(self, url: str, failures: int) -> None:
        super().__init__(url)
        self.failures = failures

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        if topic.endswith(".dlq") and self.failures:
            self.failures -= 1
            raise errors.TransientTransportError(f"{topic}: the broker is unreachable (test)")
        await super().publish(topic, message)


async def test_a_dead_letter_publish_that_meets_an_outage_is_held_and_keeps_its_reason() -> None:
    topic, name = unique("dl"), unique("dl")
    runs: list[int] = []

    @on(topic, name=name, max_attempts=3)
    async def rejects(payload: dict) -> None:
        runs.append(1)
        raise Reject("not wanted")

    transport = DeadLetterOutage(f"memory://{unique('dl')}", failures=3)
    await transport.connect()
    worker, dead = await worker_with_dead_letters(transport, rejects)
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": 1}, source="t"), "ce-"))
    await wait_for(lambda: bool(dead.received), 15, "the dead letter, once the broker takes it")
    await asyncio.sleep(0.2)  # a second run or dead letter would show meanwhile
    assert await worker.stop(5)
    reasons = [d.message.headers["conveyor-dlq-error-type"] for d in dead.received]
    assert (len(runs), reasons, transport.broker.backlog(name).pending) == (1, ["Rejected"], 0)
