"""Hostile producers on every broker: no message can stop a subscription or stay unsettled.

Each bad message is followed by good ones; the good ones must all be handled,
and every bad one must end in the dead-letter topic with a reason (never in a
delivery that is redelivered forever).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aio_pika
import orjson
import prometheus_client
import pytest
from conveyor import Context, envelope, on, ports, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from dlq_helpers import peek_until

Open = Callable[[], Awaitable[ports.Transport]]
BAD = 40  # more than the dispatcher's prefetch: bad messages that stayed unsettled would fill it


def dead_lettered(handler: str) -> float:
    labels = {"handler": handler, "outcome": "dead_lettered"}
    return prometheus_client.REGISTRY.get_sample_value("conveyor_messages_total", labels) or 0.0


def huge_attempt(topic: str, prefix: str) -> envelope.WireMessage:
    """A binary-mode event whose producer claims attempt 99999."""
    wire = envelope.to_binary(envelope.create(topic, {"kind": "bad"}, source="hostile"), prefix)
    wire.headers[prefix + "attempt"] = "99999"
    return wire


def numeric_content_type(topic: str, prefix: str) -> envelope.WireMessage:
    """A structured event whose ``datacontenttype`` is a number."""
    body = {"specversion": "1.0", "id": envelope.new_id(), "source": "hostile", "type": topic, "datacontenttype": 5}
    return envelope.WireMessage(orjson.dumps({**body, "data": {"kind": "bad"}}), {"content-type": envelope.STRUCTURED})


async def test_bad_messages_are_dead_lettered_and_good_ones_still_flow(open_transport: Open) -> None:
    topic = unique("hostile")
    good: list[int] = []

    # Two attempts: the retry path (a delay computed from the attempt) runs once for every bad message.
    @on(topic, name=unique("hostile"), concurrency=4, max_attempts=2)
    async def handle(payload: dict) -> None:
        if payload.get("kind") == "bad":
            raise RuntimeError("this message always fails")
        good.append(payload["n"])

    transport = await open_transport()
    worker = Worker(registry.Registry.of(handle).handlers, transport, source="t")
    await worker.start()
    prefix = transport.binary_prefix
    for n in range(BAD):
        bad = huge_attempt if n % 2 else numeric_content_type
        await transport.publish(topic, bad(topic, prefix))
    for n in range(20):
        await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), prefix))
    await wait_for(lambda: len(good) == 20, 60, f"the good messages (handled {len(good)})")
    listed = await peek_until(open_transport, topic, BAD, idle=1.5)
    assert await worker.stop(5)
    assert (sorted(good), len(listed)) == (list(range(20)), BAD)


async def test_a_producers_attempt_and_delay_headers_are_not_trusted(open_transport: Open) -> None:
    topic = unique("hostile")
    attempts: list[int] = []

    @on(topic, name=unique("hostile"), max_attempts=3, backoff=RetryPolicy(initial_delay=0.05, jitter=0))
    async def failing(payload: dict, ctx: Context) -> None:
        attempts.append(ctx.message.attempt)
        raise RuntimeError("always fails")

    transport = await open_transport()
    worker = Worker(registry.Registry.of(failing).handlers, transport, source="t")
    await worker.start()
    wire = envelope.to_binary(envelope.create(topic, {"n": 1}, source="hostile"), transport.binary_prefix)
    far = str(int((time.time() + 86_400) * 1000))
    wire.headers.update({transport.binary_prefix + "attempt": "5", "conveyor-attempt": "5"})
    wire.headers.update({"conveyor-not-before": far, "conveyor-due": far})
    await transport.publish(topic, wire)
    await wait_for(lambda: len(attempts) == 3, 30, "three attempts")
    assert await worker.stop(5)
    assert attempts == [1, 2, 3]


@pytest.mark.parametrize("broker_url", ["memory", "rabbit", "nats", "kafka"], indirect=True)
async def test_a_message_that_kills_its_worker_every_time_is_dead_lettered_after_max_attempts(
    open_transport: Open,
) -> None:
    topic, name = unique("crash"), unique("crash")
    runs: list[int] = []

    @on(topic, name=name, max_attempts=2)
    async def dies(payload: dict, ctx: Context) -> None:
        runs.append(ctx.message.attempt)
        await asyncio.sleep(3600)  # never settles: the worker "dies" with the message in hand

    for life in range(3):
        transport = await open_transport()
        worker = Worker(registry.Registry.of(dies).handlers, transport, source="t")
        await worker.start()
        if life == 0:
            wire = envelope.to_binary(envelope.create(topic, {"n": 1}, source="t"), transport.binary_prefix)
            await transport.publish(topic, wire)
        if life < 2:
            await wait_for(lambda life=life: len(runs) == life + 1, 30, f"run {life + 1}")
        else:  # a third run, or the dead letter the third delivery must become
            await wait_for(lambda: len(runs) == 3 or dead_lettered(name) > 0, 30, "the third delivery")
        await worker.stop(0.1)  # the deadline passes: the message is left unsettled
        await transport.close()  # ... and goes back to the broker, one delivery more
    listed = await peek_until(open_transport, topic)
    assert (len(runs), [d.error_type for d in listed]) == (2, ["TooManyDeliveries"])


async def test_header_name_that_is_not_utf8_is_dead_lettered_byte_for_byte_on_rabbitmq(rabbit_url: str) -> None:
    from conveyor.transports.rabbit import RabbitTransport
    from rabbit_raw import publish_undecodable

    topic = unique("hostile")
    good: list[int] = []

    @on(topic, name=unique("hostile"), max_attempts=2)
    async def handle(payload: dict) -> None:
        good.append(payload["n"])

    async def open_rabbit() -> ports.Transport:
        transport = RabbitTransport(rabbit_url, reconnect_max=1.0)
        await transport.connect()
        return transport

    transport = await open_rabbit()
    worker = Worker(registry.Registry.of(handle).handlers, transport, source="t")
    await worker.start()
    body = b'{"n": -1}\xff'
    async with await aio_pika.connect(rabbit_url) as client:
        await publish_undecodable(await client.channel(), topic, body)
    for n in range(3):
        await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": n}, source="t"), "ce_"))
    await wait_for(lambda: len(good) == 3, 30, f"the good messages (handled {len(good)})")
    (letter,) = await peek_until(open_rabbit, topic, 1, idle=1.5)
    assert await worker.stop(5)
    await transport.close()
    assert (letter.message.body, letter.error_type) == (body, "InvalidMessage")
    assert "bad-" in letter.error and "UTF-8" in letter.error, letter.error
    assert letter.message.headers["bad-\ufffd\ufffd-name"] == "v"
    assert sorted(good) == [0, 1, 2]
