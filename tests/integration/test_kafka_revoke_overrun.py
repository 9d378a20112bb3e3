"""A Kafka handler still running when its partition's revocation grace ends, on Tansu.

The first member's handlers run far longer than ``revoke_grace_ms``; a second
member joins, so the first revokes its partitions. Once the grace is over the
first member cancels those attempts and waits for them to end before the group
rebalances: the partitions' next owners (the second member, or the first again)
never run a record while the first's old attempt of it still runs.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from conveyor import envelope, on, registry, transports
from conveyor.runtime.worker import Worker
from conveyor.testing import brokers, unique, wait_for

OPTIONS = (
    "?partitions=4&session_timeout_ms=2000&heartbeat_interval_ms=400&rebalance_timeout_ms=8000&revoke_grace_ms=1000"
)
RECORDS = 8
OVERRUN = 30.0  # seconds a first run takes on the first member: longer than the test
TIMEOUT = 30.0


async def test_handler_running_past_the_revoke_grace_is_cancelled_before_the_new_owner_runs_its_record(
    kafka_url: str,
) -> None:
    url = brokers.with_query(kafka_url, OPTIONS)
    topic, name = unique("overrun"), unique("overrun")
    running: Counter[int] = Counter()
    started: Counter[int] = Counter()
    overlaps: list[tuple[int, str]] = []
    cancelled: list[int] = []
    done: set[int] = set()

    def member(label: str) -> registry.Handler:
        @on(topic, name=name, concurrency=RECORDS)
        async def handle(payload: dict) -> None:
            n = payload["n"]
            if running[n]:
                overlaps.append((n, label))
            running[n] += 1
            started[n] += 1
            try:
                if label == "first" and started[n] == 1:
                    await asyncio.sleep(OVERRUN)
            except asyncio.CancelledError:
                cancelled.append(n)
                raise
            finally:
                running[n] -= 1
            done.add(n)

        (handler,) = registry.Registry.of(handle).handlers
        return handler

    first, second = transports.create(url), transports.create(url)
    await first.connect()
    await second.connect()
    one = Worker([member("first")], first, source="t")
    two = Worker([member("second")], second, source="t")
    try:
        await one.start()
        for n in range(RECORDS):
            event = envelope.create(topic, {"n": n}, source="t", key=f"k{n}")
            await first.publish(topic, envelope.to_binary(event, envelope.KAFKA_PREFIX))
        await wait_for(lambda: sum(running.values()) == RECORDS, TIMEOUT, "every record running on the first member")
        await two.start()  # the first member revokes its partitions; its handlers overrun the grace
        await wait_for(lambda: len(done) == RECORDS or bool(overlaps), TIMEOUT, "every record handled")
    finally:
        await one.stop(5)
        await two.stop(5)
        await first.close()
        await second.close()
    assert overlaps == []
    assert (sorted(cancelled), done) == (list(range(RECORDS)), set(range(RECORDS)))
