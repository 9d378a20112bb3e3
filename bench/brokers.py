"""Conveyor on each broker next to the raw client, measured in the same run.

For RabbitMQ (aio-pika), NATS JetStream (nats-py) and Kafka (aiokafka on a
Tansu broker started here), with ~1 KiB messages and an ack/commit per message:

* consume: a no-op handler through the worker runtime and the transport,
  against the raw client's consume loop (``raw_clients.raw_consume_rate``);
* publish: ``Publisher.publish`` awaiting the broker's confirmation, one at a
  time and with a window of concurrent publishes, against the raw client.

Consume rates run from the first to the last handled message over a backlog
published beforehand (subscription set-up excluded), as the raw figures do.

    .venv/bin/python bench/brokers.py --count 5000 --brokers rabbit,nats,kafka
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import raw_clients
from conveyor import Publisher, envelope, ports, registry, transports
from conveyor.runtime.worker import Worker
from conveyor.testing import unique
from conveyor.testing.brokers import TansuBroker

URLS = {"rabbit": "amqp://guest:guest@127.0.0.1:5672/", "nats": "nats://127.0.0.1:4222"}
DATA = {"order_id": "o-1", "note": "x" * 980}


async def windowed(calls: list, window: int) -> None:  # type: ignore[type-arg]
    for start in range(0, len(calls), window):
        await asyncio.gather(*(call() for call in calls[start : start + window]))


async def conveyor_consume_rate(url: str, count: int, concurrency: int) -> float:
    transport = transports.create(url)
    await transport.connect()
    topic, name = unique("bench"), unique("bench")
    stamps: list[float] = []
    done = asyncio.Event()

    @registry.on(topic, name=name, concurrency=concurrency)
    async def noop(payload: bytes) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == count:
            done.set()

    worker = Worker(registry.Registry.of(noop).handlers, transport, source="bench", concurrency=concurrency)
    await worker.declare()
    wire = [
        envelope.to_binary(envelope.create(topic, DATA, source="bench"), transport.binary_prefix) for _ in range(count)
    ]
    await windowed([lambda m=m: transport.publish(topic, m) for m in wire], 200)
    await worker.start()
    await asyncio.wait_for(done.wait(), timeout=max(60, count / 200))
    await worker.stop(5)
    await transport.close()
    return (count - 1) / (stamps[-1] - stamps[0])


async def conveyor_publish_rate(url: str, count: int, window: int) -> float:
    async with Publisher(url, source="bench") as publisher:
        topic = unique("bench")
        transport = publisher._transport  # declare the topic so the broker keeps the messages
        await transport.declare([topic], [ports.Subscription(name=unique("bench"), topic=topic)])
        started = time.perf_counter()
        await windowed([lambda: publisher.publish(topic, DATA) for _ in range(count)], window)
        return count / (time.perf_counter() - started)


async def measure(
    broker: raw_clients.Broker, url: str, target: str | None, count: int, window: int
) -> list[tuple[str, float, float]]:
    rows = []
    raw = await raw_clients.raw_consume_rate(broker, count, target=target)
    ours = await conveyor_consume_rate(url, count, concurrency=16)
    rows.append(("consume, ack each (no-op handler)", ours, raw))
    for w in (1, window):
        raw = await raw_clients.raw_publish_rate(broker, count if w > 1 else count // 5, window=w, target=target)
        ours = await conveyor_publish_rate(url, count if w > 1 else count // 5, w)
        rows.append((f"publish, confirmed, window {w}", ours, raw))
    return rows


async def main(brokers: list[raw_clients.Broker], count: int, window: int) -> None:
    print(f"{count} messages of ~1 KiB; rates in messages/s; ratio = Conveyor / raw client")
    print(f"{'broker':<8}{'case':<38}{'conveyor':>11}{'raw':>11}{'ratio':>8}")
    for broker in brokers:
        if broker == "kafka":
            with TansuBroker() as tansu:
                rows = await measure(broker, tansu.url, tansu.bootstrap, count, window)
        else:
            rows = await measure(broker, URLS[broker], None, count, window)
        for case, ours, raw in rows:
            print(f"{broker:<8}{case:<38}{ours:>11,.0f}{raw:>11,.0f}{ours / raw:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument(
        "--brokers", type=raw_clients.parse_brokers, default=raw_clients.parse_brokers("rabbit,nats,kafka")
    )
    args = parser.parse_args()
    asyncio.run(main(args.brokers, args.count, args.window))
