"""Operators' view of the outbox: list, show, retry and purge parked rows; parked figures in stats and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from conveyor import errors
from conveyor.runtime import relay
from relay_helpers import TOPIC, Broker, add, open_broker

from event_store import Database, SqlOutboxStore


@pytest.fixture
async def store(db: Database) -> AsyncIterator[SqlOutboxStore]:
    opened = SqlOutboxStore(db, listen=False)
    yield opened
    await opened.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with open_broker() as opened:
        yield opened


async def _park(store: SqlOutboxStore, count: int, *, key: str | None = None) -> list[str]:
    """Add ``count`` rows and park them as the relay does after their last attempt."""
    ids = await add(store.db, count, key=key)
    async with store.claim(1000) as batch:
        for message in batch.messages:
            if message.message_id in ids:
                batch.parked(message, "TransportError: refused by the test")
    return ids


async def test_outbox_entries_parked_lists_only_parked_rows(store: SqlOutboxStore) -> None:
    parked = await _park(store, 2)
    await add(store.db, 1)
    assert [e.message.message_id for e in await store.entries(status="parked")] == parked


async def test_outbox_entries_pending_excludes_parked_rows(store: SqlOutboxStore) -> None:
    await _park(store, 2)
    pending = await add(store.db, 1)
    assert [e.message.message_id for e in await store.entries(status="pending")] == pending


async def test_outbox_entries_topic_keeps_rows_of_that_topic(store: SqlOutboxStore) -> None:
    await add(store.db, 2)
    other = await add(store.db, 1, topic="relay.other")
    assert [e.message.message_id for e in await store.entries(topic="relay.other")] == other


async def test_outbox_entries_limit_keeps_oldest_rows(store: SqlOutboxStore) -> None:
    ids = await add(store.db, 5)
    assert [e.message.message_id for e in await store.entries(limit=2)] == ids[:2]


async def test_outbox_get_parked_row_has_attempts_and_last_error(store: SqlOutboxStore) -> None:
    [message_id] = await _park(store, 1, key="k")
    entry = await store.get(message_id)
    assert (entry.status, entry.message.attempts, entry.last_error, entry.message.key) == (
        "parked", 1, "TransportError: refused by the test", "k",
    )  # fmt: skip


async def test_outbox_get_unknown_message_id_raises_not_found(store: SqlOutboxStore) -> None:
    with pytest.raises(errors.NotFound, match="no-such-id"):
        await store.get("no-such-id")


async def test_outbox_retry_parked_row_is_claimed_again_with_no_attempts(store: SqlOutboxStore) -> None:
    [message_id] = await _park(store, 1)
    await store.retry([message_id])
    async with store.claim(10) as batch:
        claimed = [(m.message_id, m.attempts) for m in batch.messages]
    assert claimed == [(message_id, 0)]


async def test_outbox_retry_all_unparks_every_parked_row(store: SqlOutboxStore) -> None:
    await _park(store, 3)
    assert (await store.retry(None), await store.entries(status="parked")) == (3, [])


async def test_outbox_retry_unknown_id_raises_not_found_and_changes_nothing(store: SqlOutboxStore) -> None:
    [message_id] = await _park(store, 1)
    with pytest.raises(errors.NotFound, match="no-such-id"):
        await store.retry([message_id, "no-such-id"])
    assert (await store.get(message_id)).status == "parked"


async def test_outbox_purge_parked_deletes_only_parked_rows(store: SqlOutboxStore) -> None:
    await _park(store, 2)
    pending = await add(store.db, 1)
    assert await store.purge_parked(None) == 2
    assert [e.message.message_id for e in await store.entries()] == pending


async def test_outbox_purge_parked_pending_id_raises_not_found(store: SqlOutboxStore) -> None:
    [pending] = await add(store.db, 1)
    with pytest.raises(errors.NotFound, match=pending):
        await store.purge_parked([pending])


async def test_outbox_purge_parked_keyed_row_releases_its_key(store: SqlOutboxStore) -> None:
    [parked] = await _park(store, 1, key="k")
    later = await add(store.db, 2, key="k")
    await store.purge_parked([parked])
    async with store.claim(10) as batch:
        assert [m.message_id for m in batch.messages] == later


async def test_outbox_stats_counts_parked_rows(store: SqlOutboxStore) -> None:
    await _park(store, 2)
    await add(store.db, 1)
    stats = await store.stats()
    assert (stats.backlog, stats.parked) == (3, 2)


async def test_outbox_topics_counts_every_unsent_and_parked_row_per_topic(store: SqlOutboxStore) -> None:
    await _park(store, 2)
    await add(store.db, 3)
    await add(store.db, 4, topic="relay.other")
    sent = await add(store.db, 1, topic="relay.sent")
    async with store.claim(1000) as batch:
        for message in batch.messages:
            if message.message_id in sent:
                batch.sent(message)
    topics = await store.topics()
    assert [(t.topic, t.unsent, t.parked) for t in topics] == [("relay.other", 4, 0), (TOPIC, 5, 2)]
    assert [t.topic for t in await store.topics(limit=1)] == ["relay.other"]


async def test_outbox_stats_counts_due_and_scheduled_rows_apart(store: SqlOutboxStore) -> None:
    await _park(store, 1)
    await add(store.db, 2)
    await add(store.db, 3, delay=timedelta(minutes=5))  # saga timers, delayed messages: not yet due
    stats = await store.stats()
    assert (stats.backlog, stats.due, stats.scheduled, stats.parked) == (6, 2, 3, 1)


async def test_outbox_topics_counts_due_and_scheduled_rows_apart(store: SqlOutboxStore) -> None:
    await _park(store, 1)
    await add(store.db, 2)
    await add(store.db, 3, delay=timedelta(minutes=5))
    [topic] = await store.topics()
    assert (topic.unsent, topic.due, topic.scheduled, topic.parked) == (6, 2, 3, 1)


async def test_relay_refresh_metrics_sets_parked_gauge(store: SqlOutboxStore, broker: Broker) -> None:
    await _park(store, 2)
    await relay.Relay(store, broker.transport).refresh_metrics()
    assert relay.OUTBOX_PARKED._value.get() == 2


async def test_relay_refresh_metrics_sets_due_and_scheduled_gauges(store: SqlOutboxStore, broker: Broker) -> None:
    await add(store.db, 1)
    await add(store.db, 2, delay=timedelta(minutes=5))
    await relay.Relay(store, broker.transport).refresh_metrics()
    assert (relay.OUTBOX_DUE._value.get(), relay.OUTBOX_SCHEDULED._value.get()) == (1, 2)
