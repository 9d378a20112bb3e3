"""Worker metrics show failures as well as successes."""

from __future__ import annotations

import prometheus_client
from conveyor import envelope, on, registry
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport


def observed(handler: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value("conveyor_handler_seconds_count", {"handler": handler})
    return value or 0.0


async def test_handler_seconds_counts_failed_attempts() -> None:
    topic, name = unique("metrics"), unique("metrics")
    calls: list[int] = []

    @on(topic, name=name, max_attempts=1)
    async def failing(payload: dict) -> None:
        calls.append(1)
        raise RuntimeError("fails")

    transport = MemoryTransport(f"memory://{unique('metrics')}")
    await transport.connect()
    worker = Worker(registry.Registry.of(failing).handlers, transport, source="t")
    await worker.start()
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {}, source="t"), transport.binary_prefix))
    await wait_for(lambda: bool(calls), 5, "the attempt")
    assert await worker.stop(5)
    await transport.close()
    assert observed(name) == 1
