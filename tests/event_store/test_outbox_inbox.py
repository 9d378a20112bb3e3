"""Outbox rows and inbox claims join the caller's transaction."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from conveyor import envelope, errors
from sqlalchemy.ext.asyncio import AsyncSession

from event_store import Database, Inbox, Outbox, SqlOutboxStore, models


async def _count(db: Database, table: str) -> int:
    async with db.transaction(readonly=True) as session:
        return int((await session.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one())


@pytest.fixture
async def orders(db: Database) -> Database:
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE orders (id VARCHAR(50) PRIMARY KEY, effects INTEGER)"))
    return db


async def test_add_stores_envelope_as_binary_cloudevent(db: Database) -> None:
    outbox = Outbox(source="orders")
    async with db.transaction() as session:
        event = await outbox.add(session, "orders.placed", {"id": 1}, key="o-1")
    async with db.transaction(readonly=True) as session:
        row = (await session.execute(sa.select(models.outbox))).one()
    decoded = envelope.decode(envelope.WireMessage(body=row.body, headers=row.headers))
    assert (row.message_id, row.topic, row.partition_key) == (event.id, "orders.placed", "o-1")
    assert (decoded.id, decoded.source, decoded.type, decoded.json()) == (
        event.id,
        "orders",
        "orders.placed",
        {"id": 1},
    )


async def test_add_invalid_topic_raises_configuration_error(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(errors.ConfigurationError):
            await Outbox().add(session, "orders.*", {})


async def test_add_naive_at_raises_configuration_error(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(errors.ConfigurationError):
            await Outbox().add(session, "orders.placed", {}, at=datetime(2030, 1, 1))


async def test_transaction_that_raises_leaves_no_business_outbox_or_inbox_row(orders: Database) -> None:
    db = orders

    async def failing_handler() -> None:
        async with db.transaction() as session:
            assert await Inbox().claim(session, "billing.charge", "m-1")
            await session.execute(sa.text("INSERT INTO orders (id, effects) VALUES ('o-1', 1)"))
            await Outbox().add(session, "payments.charged", {"order": "o-1"})
            raise RuntimeError("handler failed after its writes")

    with pytest.raises(RuntimeError):
        await failing_handler()
    assert [await _count(db, t) for t in ("orders", "outbox", "inbox")] == [0, 0, 0]


async def _handle_once(db: Database, message_id: str) -> bool:
    """A handler body: inbox claim first, then its effect; returns whether it ran."""
    async with db.transaction() as session:
        if not await Inbox().claim(session, "billing.charge", message_id):
            return False
        await session.execute(sa.text("UPDATE orders SET effects = effects + 1 WHERE id = 'o-1'"))
        return True


async def _effects(db: Database) -> int:
    async with db.transaction(readonly=True) as session:
        return int((await session.execute(sa.text("SELECT effects FROM orders"))).scalar_one())


async def test_inbox_same_message_three_times_effect_once(orders: Database) -> None:
    db = orders
    async with db.transaction() as session:
        await session.execute(sa.text("INSERT INTO orders (id, effects) VALUES ('o-1', 0)"))
    ran = [await _handle_once(db, "m-1") for _ in range(3)]
    assert (ran, await _effects(db)) == ([True, False, False], 1)


async def test_inbox_same_message_two_concurrent_sessions_effect_once(orders: Database) -> None:
    db = orders
    async with db.transaction() as session:
        await session.execute(sa.text("INSERT INTO orders (id, effects) VALUES ('o-1', 0)"))
    ran = await asyncio.gather(_handle_once(db, "m-1"), _handle_once(db, "m-1"))
    assert (sorted(ran), await _effects(db)) == ([False, True], 1)


async def test_inbox_duplicate_claim_keeps_transaction_usable(orders: Database) -> None:
    db = orders
    async with db.transaction() as session:
        await Inbox().claim(session, "billing.charge", "m-1")
    async with db.transaction() as session:
        assert not await Inbox().claim(session, "billing.charge", "m-1")
        await session.execute(sa.text("INSERT INTO orders (id, effects) VALUES ('o-2', 0)"))
    assert await _count(db, "orders") == 1


async def test_inbox_other_handler_same_message_claims(db: Database) -> None:
    async with db.transaction() as session:
        assert await Inbox().claim(session, "billing.charge", "m-1")
        assert await Inbox().claim(session, "shipping.ship", "m-1")


async def _age(db: Database, table: str, column: str, days: int) -> None:
    async with db.transaction() as session:
        old = datetime.now(UTC) - timedelta(days=days)
        await session.execute(sa.update(models.metadata.tables[table]).values({column: old}))


async def test_inbox_purge_deletes_only_old_rows(db: Database) -> None:
    async with db.transaction() as session:
        await Inbox().claim(session, "billing.charge", "old")
    await _age(db, "inbox", "processed_at", 10)
    async with db.transaction() as session:
        await Inbox().claim(session, "billing.charge", "new")
    assert await Inbox(db).purge(timedelta(days=7)) == 1
    assert await _count(db, "inbox") == 1


async def _add(db: Database, count: int, **kwargs: object) -> None:
    async with db.transaction() as session:
        for n in range(count):
            await Outbox().add(session, "t.x", {"n": n}, **kwargs)  # type: ignore[arg-type]


async def _claim_and_send(store: SqlOutboxStore, limit: int = 100) -> list[int]:
    async with store.claim(limit) as batch:
        for message in batch.messages:
            batch.sent(message)
        return [m.id for m in batch.messages]


async def test_outbox_purge_deletes_only_old_sent_rows(db: Database) -> None:
    store = SqlOutboxStore(db, listen=False)
    await _add(db, 2)
    await _claim_and_send(store)
    await _age(db, "outbox", "sent_at", 10)
    await _add(db, 1)
    await _claim_and_send(store)
    await _add(db, 1)  # unsent
    assert await store.purge(timedelta(days=7)) == 2
    assert await _count(db, "outbox") == 2


async def test_outbox_ids_not_reused_after_purge(db: Database) -> None:
    store = SqlOutboxStore(db, listen=False)
    await _add(db, 3)
    first = await _claim_and_send(store)
    await _age(db, "outbox", "sent_at", 10)
    await store.purge(timedelta(days=1))
    await _add(db, 1)
    assert (await _claim_and_send(store))[0] > max(first)


async def test_outbox_stats_count_backlog_and_oldest_age(db: Database) -> None:
    store = SqlOutboxStore(db, listen=False)
    await _add(db, 3)
    await _add(db, 1, delay=3600)
    await _age(db, "outbox", "created_at", 0)
    async with db.transaction() as session:
        await session.execute(
            sa.update(models.outbox)
            .where(models.outbox.c.available_at <= datetime.now(UTC))
            .values(available_at=datetime.now(UTC) - timedelta(seconds=90))
        )
    stats = await store.stats()
    assert stats.backlog == 4
    assert 89 <= stats.oldest_age < 150


async def test_outbox_session_commit_sets_in_process_signal(db: Database) -> None:
    db.outbox_signal.clear()
    await _add(db, 1)
    assert db.outbox_signal.is_set()


async def _session_rows(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT count(*) FROM outbox"))).scalar_one())


async def test_outbox_rolled_back_add_does_not_signal(db: Database) -> None:
    db.outbox_signal.clear()

    async def rolled_back() -> None:
        async with db.transaction() as session:
            await Outbox().add(session, "t.x", {})
            assert await _session_rows(session) == 1
            raise RuntimeError

    with pytest.raises(RuntimeError):
        await rolled_back()
    assert not db.outbox_signal.is_set()


async def test_a_delay_counts_from_the_add_not_from_the_start_of_a_long_transaction(db: Database) -> None:
    from event_store.outbox import as_utc

    async with db.transaction() as session:
        began = as_utc((await session.execute(sa.select(models.utcnow()))).scalar_one())
    async with db.transaction() as session:
        await session.execute(sa.text("SELECT 1"))  # the transaction has begun (as the inbox claim begins it)
        await asyncio.sleep(1.0)  # a handler busy inside its transaction before it publishes
        await Outbox().add(session, "orders.later", {"n": 1}, delay=2.0)
    async with db.transaction() as session:
        due = as_utc((await session.execute(sa.select(models.outbox.c.available_at))).scalar_one())
    # Due 2 s after the add: at least 2.9 s after the transaction began (1 s of work, then the delay).
    assert (due - began).total_seconds() >= 2.9
