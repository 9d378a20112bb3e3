"""Sync handlers run in threads, which cannot be interrupted: a timed-out one never overlaps its retry."""

from __future__ import annotations

import threading
import time

from conveyor import Context, envelope, on, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport


async def test_a_timed_out_sync_handler_finishes_before_its_retry_starts() -> None:
    topic = unique("sync")
    spans: list[tuple[int, float, float]] = []
    lock = threading.Lock()

    @on(topic, name=unique("sync"), timeout=0.2, backoff=RetryPolicy(initial_delay=0.01, jitter=0))
    def slow_first(payload: dict, ctx: Context) -> None:
        started = time.monotonic()
        if ctx.message.attempt == 1:
            time.sleep(0.8)  # far past the timeout: the thread keeps running
        with lock:
            spans.append((ctx.message.attempt, started, time.monotonic()))

    transport = MemoryTransport(f"memory://{unique('sync')}")
    await transport.connect()
    worker = Worker(registry.Registry.of(slow_first).handlers, transport, source="t")
    await worker.start()
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {}, source="t"), transport.binary_prefix))
    await wait_for(lambda: len(spans) == 2, 10, "both attempts")
    assert await worker.stop(5)
    await transport.close()
    (first, _, first_end), (second, second_start, _) = sorted(spans)
    assert (first, second) == (1, 2) and second_start >= first_end
