"""Dead letters on every broker: listed without being consumed, replayed to their topic, purged."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from conveyor import Reject, envelope, on, ports, registry
from conveyor.runtime import dead_letters
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from dlq_helpers import peek_until

Open = Callable[[], Awaitable[ports.Transport]]


async def peek(open_transport: Open, topic: str) -> list[dead_letters.DeadLetter]:
    transport = await open_transport()
    try:
        return await dead_letters.peek(transport, topic, idle=1.5)
    finally:
        await transport.close()  # what was peeked goes back to the broker


async def test_dead_letters_are_listed_in_place_then_replayed_to_a_fixed_handler(open_transport: Open) -> None:
    topic, name = unique("dl"), unique("dl")
    fixed: list[bool] = [False]
    handled: list[int] = []

    @on(topic, name=name)
    async def sometimes(payload: dict) -> None:
        if not fixed[0]:
            raise Reject("not yet supported")
        handled.append(payload["n"])

    transport = await open_transport()
    worker = Worker(registry.Registry.of(sometimes).handlers, transport, source="t")
    await worker.start()
    sent = [envelope.create(topic, {"n": n}, source="t") for n in range(3)]
    for event in sent:
        await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))

    listed = await peek_until(open_transport, topic, 3, idle=1.5)
    assert sorted(d.event_id or "" for d in listed) == sorted(e.id for e in sent)
    reasons = {(d.handler, d.error_type, d.error, d.topic) for d in listed}
    assert reasons == {(name, "Rejected", "not yet supported", topic)}
    assert len(await peek(open_transport, topic)) == 3, "listing must leave dead letters in place"

    fixed[0] = True
    replayer = await open_transport()
    assert len(await dead_letters.replay(replayer, topic, idle=1.5)) == 3
    await wait_for(lambda: sorted(handled) == [0, 1, 2], 30, "the replayed messages")
    assert await peek(open_transport, topic) == []
    assert await worker.stop(5)


async def test_purge_deletes_dead_letters(open_transport: Open) -> None:
    topic = unique("dl")

    @on(topic, name=unique("dl"))
    async def never(payload: dict) -> None:
        raise Reject("never")

    transport = await open_transport()
    worker = Worker(registry.Registry.of(never).handlers, transport, source="t")
    await worker.start()
    for n in range(2):
        wire = envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), transport.binary_prefix)
        await transport.publish(topic, wire)
    purged: list[dead_letters.DeadLetter] = []
    deadline = time.monotonic() + 45
    while len(purged) < 2 and time.monotonic() < deadline:
        purger = await open_transport()
        try:
            purged += await dead_letters.purge(purger, topic, idle=1.5)
        finally:
            await purger.close()
    assert len(purged) == 2
    assert await peek(open_transport, topic) == []
    assert await worker.stop(5)
