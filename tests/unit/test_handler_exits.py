"""A handler (or a library it calls) raising ``SystemExit`` or ``KeyboardInterrupt`` fails its message only."""

from __future__ import annotations

import sys

import pytest
from conveyor import envelope, on
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport
from dlq_helpers import worker_with_dead_letters


@pytest.mark.parametrize("raised", [SystemExit(2), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("batch", [None, 2], ids=["single", "batch"])
async def test_an_exit_raised_by_a_handler_dead_letters_its_message_and_the_worker_goes_on(
    raised: BaseException, batch: int | None
) -> None:
    topic, name = unique("exit"), unique("exit")
    handled: list[int] = []

    def work(n: int) -> None:
        if n == 0:
            raise raised
        handled.append(n)

    if batch is None:

        @on(topic, name=name, max_attempts=1)
        async def handle(payload: dict) -> None:
            work(payload["n"])

    else:

        @on(topic, name=name, max_attempts=1, batch=batch, batch_wait=0.01)
        async def handle(payloads: list[dict]) -> None:
            for payload in payloads:
                work(payload["n"])

    transport = MemoryTransport(f"memory://{unique('exit')}")
    await transport.connect()
    worker, dead = await worker_with_dead_letters(transport, handle)
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": 0}, source="t"), "ce-"))
    await wait_for(lambda: bool(dead.received), 5, "the dead letter of the exiting message")
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": 1}, source="t"), "ce-"))
    await wait_for(lambda: handled == [1], 5, "the next message, handled by the same worker")
    assert await worker.stop(5)
    assert type(raised).__name__ in dead.received[0].message.headers["conveyor-dlq-error"]
    assert sys.exc_info() == (None, None, None)
