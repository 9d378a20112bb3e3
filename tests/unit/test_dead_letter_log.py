"""The log line of a dead letter: one line naming the handler, the event and the reason."""

from __future__ import annotations

import logging

import pydantic
import pytest
from conveyor import Reject, envelope, on, registry
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport


class Order(pydantic.BaseModel):
    total_cents: int = pydantic.Field(gt=0)


async def test_dead_letter_of_a_pydantic_rejection_logs_one_line_with_handler_event_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic, name = unique("log"), unique("log")

    @on(topic, name=name)
    async def check(payload: dict) -> None:
        try:
            Order.model_validate(payload)
        except pydantic.ValidationError as exc:
            raise Reject(f"not a valid order: {exc}") from None

    transport = MemoryTransport(f"memory://{unique('log')}")
    await transport.connect()
    worker = Worker(registry.Registry.of(check).handlers, transport, source="t")
    await worker.start()
    event = envelope.create(topic, {"total_cents": 0}, source="t")
    with caplog.at_level(logging.ERROR, logger="conveyor.worker"):
        await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))
        await wait_for(lambda: any("dead-lettered" in r.getMessage() for r in caplog.records), 10, "the log line")
    assert await worker.stop(5)
    await transport.close()
    (line,) = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert (name in line, event.id in line, "\n" in line) == (True, True, False)
    assert line.endswith(
        "Rejected: not a valid order: 1 validation error for Order; total_cents: Input should be greater than 0"
    )
