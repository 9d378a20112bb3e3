"""Backlog of a Kafka subscription: its consumer group's lag on the topic.

``pending`` is, summed over the topic's partitions, the end offset minus the
group's committed offset (the beginning offset for a partition the group has
never committed: a new group starts at the earliest record). Offsets are
committed only once a record and every earlier one are settled, so this
counts records handed out and not yet settled too (and, until the background
commit lands, a moment after, settled ones); ``in_flight`` is None.
Delayed retries wait in the subscription's retry topic and are not counted.
``oldest_age_s`` is the age of the oldest first unsettled record (at the
committed offset) of the partitions with lag, by its record timestamp (its
producer's clock with ``CreateTime``); one small fetch per such partition, so
None when a partition does not answer within :data:`AGE_FETCH_SECONDS`.

The committed offsets come from the admin client (an ``OffsetFetch``), the
end offsets from a consumer without a group: neither joins the subscription's
group, so reading the lag never causes a rebalance. Nothing is created: a
topic missing from the cluster's list is :class:`~conveyor.errors.NotDeclared`
(a metadata request naming it could have the broker create it).
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient

from conveyor import errors, ports

_FAILURES = (kafka_errors.KafkaError, OSError)
AGE_FETCH_SECONDS = 1.0
"""Longest wait for the first unsettled records of the partitions with lag."""


class LagReader:
    """Reads consumer-group lag; holds a group-less consumer, started on first use.

    Args:
        servers: the bootstrap servers.
        request_timeout_ms: the clients' request timeout.
    """

    def __init__(self, servers: list[str], request_timeout_ms: int) -> None:
        self._servers = ",".join(servers)
        self._timeout_ms = request_timeout_ms
        self._offsets: AIOKafkaConsumer | None = None
        self._fetcher: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._fetch_lock = asyncio.Lock()  # the fetcher's assignment serves one read at a time

    async def _reader(self) -> AIOKafkaConsumer:
        async with self._lock:
            if self._offsets is None:
                reader = AIOKafkaConsumer(
                    bootstrap_servers=self._servers,
                    client_id="conveyor-backlog",
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=self._timeout_ms,
                )
                try:
                    await reader.start()
                except _FAILURES:
                    await reader.stop()
                    raise
                self._offsets = reader
            return self._offsets

    async def _fetcher_started(self) -> AIOKafkaConsumer:
        async with self._lock:
            if self._fetcher is None:
                fetcher = AIOKafkaConsumer(
                    bootstrap_servers=self._servers,
                    client_id="conveyor-backlog-age",
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=self._timeout_ms,
                    max_partition_fetch_bytes=64 * 1024,  # the broker still returns a first larger batch whole
                    fetch_max_wait_ms=100,
                )
                try:
                    await fetcher.start()
                except _FAILURES:
                    await fetcher.stop()
                    raise
                self._fetcher = fetcher
            return self._fetcher

    async def _oldest_age(self, positions: dict[TopicPartition, int]) -> float | None:
        """Seconds since the oldest timestamp of the records at ``positions``; None unless every one answered."""
        fetcher = await self._fetcher_started()
        oldest: dict[TopicPartition, int] = {}
        async with self._fetch_lock:
            fetcher.assign(list(positions))
            try:
                for tp, offset in positions.items():
                    fetcher.seek(tp, offset)
                deadline = time.monotonic() + AGE_FETCH_SECONDS
                while len(oldest) < len(positions) and (left := deadline - time.monotonic()) > 0:
                    waiting = [tp for tp in positions if tp not in oldest]
                    batches = await fetcher.getmany(*waiting, timeout_ms=int(left * 1000))
                    for tp, records in batches.items():
                        if records and tp not in oldest:
                            oldest[tp] = records[0].timestamp
                            fetcher.pause(tp)
            finally:
                fetcher.unsubscribe()
        if len(oldest) < len(positions):
            return None
        return max(time.time() - min(oldest.values()) / 1000, 0.0)

    async def lag(self, admin: AIOKafkaAdminClient, subscription: ports.Subscription) -> ports.Backlog:
        """The lag of group ``subscription.name`` on ``subscription.topic``.

        Raises:
            NotDeclared: the topic does not exist.
            TransportError: the broker failed.
            TransientTransportError: the broker is unreachable.
        """
        topic = subscription.topic
        try:
            if topic not in await admin.list_topics():  # describing a missing topic would create it
                raise errors.NotDeclared(f"Kafka topic {topic!r} does not exist: declare the subscription first")
            described = await admin.describe_topics([topic])
            found = [p["partition"] for t in described if t.get("topic") == topic for p in t.get("partitions") or ()]
            if not found:
                raise errors.NotDeclared(f"Kafka topic {topic!r} does not exist: declare the subscription first")
            partitions = [TopicPartition(topic, p) for p in sorted(found)]
            committed = await admin.list_consumer_group_offsets(subscription.name, partitions=partitions)
            reader = await self._reader()
            ends = await reader.end_offsets(partitions)
            starts = await reader.beginning_offsets(partitions)
        except _FAILURES as exc:
            transient = isinstance(exc, OSError) or getattr(exc, "retriable", False)
            kind = errors.TransientTransportError if transient else errors.TransportError
            raise kind(f"lag of Kafka group {subscription.name!r} on {topic!r}: {exc!r}") from exc
        pending, behind = 0, {}
        for tp in partitions:
            mark = committed.get(tp)
            position = max(mark.offset if mark is not None and mark.offset >= 0 else 0, starts[tp])
            if ends[tp] > position:
                pending += ends[tp] - position
                behind[tp] = position
        age: float | None = 0.0  # nothing unsettled
        if behind:
            try:
                age = await self._oldest_age(behind)
            except _FAILURES:
                age = None  # the count stands without the age
        return ports.Backlog(pending=pending, oldest_age_s=age)

    async def close(self) -> None:
        """Stop the group-less consumer; idempotent."""
        for reader in (self._offsets, self._fetcher):
            if reader is not None:
                await reader.stop()
        self._offsets = self._fetcher = None
