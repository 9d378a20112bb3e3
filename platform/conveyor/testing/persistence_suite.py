"""The persistence conformance suite: one set of tests every persistence backend must pass.

A backend proves itself by subclassing :class:`PersistenceConformance` in a
test module and providing two fixtures::

    class TestSqlitePersistence(PersistenceConformance):
        @pytest.fixture
        def persistence(self, db):
            return event_store.sql_persistence(db, "conformance")

        @pytest.fixture
        def outbox_topics(self, db):
            async def read():
                ...  # (topic, message_id) of every outbox row, in insertion order
            return read

``persistence`` is a :class:`~conveyor.persistence.Persistence` on a fresh,
empty, migrated store (one per test); the subclass closes it after the test.
``outbox_topics`` is the one window the suite has on the backend's storage:
the outbox has no reading port apart from the relay's claim, which this suite
does not exercise. Everything else is observed through the ports themselves
(an inbox claim that returns False proves a committed row, say).

The suite speaks only to the ports: no SQL and no driver. The store must be
empty at the start of each test: the ``read_all`` and outbox tests compare
the whole log and the whole outbox.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor import errors
from conveyor.persistence import Outgoing, Persistence
from conveyor.testing.store_suite import (
    CallerError,
    OutboxTopics,
    StoreContracts,
    inbox_has,
    new_envelope,
    new_event,
    raise_in_transaction,
)
from conveyor.testing.support import unique


class PersistenceConformance(StoreContracts):
    """Behaviour every implementation of the persistence ports must show.

    The ports are those of :class:`~conveyor.persistence.Persistence`:
    :class:`~conveyor.persistence.Database`,
    :class:`~conveyor.persistence.UnitOfWorkFactory`,
    :class:`~conveyor.persistence.OutboxWriter`,
    :class:`~conveyor.stores.InboxStore`, :class:`~conveyor.stores.EventStore` and
    :class:`~conveyor.persistence.ScheduleStore`. The relay's side of the
    outbox (:class:`~conveyor.stores.OutboxStore`) is not covered here.
    """

    #: seconds a blocked operation must stay blocked to count as waiting.
    blocked_for: float = 0.3

    @pytest.fixture
    def persistence(self) -> Persistence:
        """Return the stores of a fresh, empty, migrated database (override in the subclass).

        The subclass closes the database (and checks for leaked connections)
        after the test.
        """
        raise NotImplementedError("subclasses provide the persistence fixture")

    @pytest.fixture
    def outbox_topics(self) -> OutboxTopics:
        """Return a reader of ``(topic, message_id)`` of every stored outbox row, in insertion order.

        Only committed rows are visible to it (it reads in a transaction of its
        own). Override in the subclass; the SQL backends run a query.
        """
        raise NotImplementedError("subclasses provide the outbox_topics fixture")

    # -- Database.transaction ----------------------------------------------------

    async def test_transaction_exiting_normally_commits(self, persistence: Persistence) -> None:
        """Database.transaction: the block's writes commit when it exits normally."""
        handler, message_id = unique("handler"), unique("msg")
        async with persistence.database.transaction() as tx:
            await persistence.inbox.claim(tx, handler, message_id)
        assert await inbox_has(persistence, handler, message_id)

    async def test_transaction_block_raising_rolls_back(self, persistence: Persistence) -> None:
        """Database.transaction: if the block raises, its writes are rolled back."""
        handler, message_id = unique("handler"), unique("msg")
        with pytest.raises(CallerError):
            await raise_in_transaction(
                persistence, lambda tx: persistence.inbox.claim(tx, handler, message_id), CallerError()
            )
        assert not await inbox_has(persistence, handler, message_id)

    async def test_transaction_callers_connection_error_propagates_unchanged(self, persistence: Persistence) -> None:
        """Database.transaction: a caller's own ConnectionError is never reported as a StoreError."""
        raised = ConnectionError("the payment API hung up")

        async def claim(tx: Any) -> bool:
            return await persistence.inbox.claim(tx, unique("handler"), unique("msg"))

        with pytest.raises(ConnectionError) as info:
            await raise_in_transaction(persistence, claim, raised)
        assert info.value is raised

    async def test_transaction_readonly_reads_committed_rows(self, persistence: Persistence) -> None:
        """Database.transaction(readonly=True): the transaction can read."""
        stream = unique("stream")
        await persistence.events.append(stream, [new_event()], expected_version=0)
        async with persistence.database.transaction(readonly=True) as tx:
            recorded = await persistence.events.read_stream(stream, tx=tx)
        assert [e.version for e in recorded] == [1]

    # -- UnitOfWorkFactory.begin / UnitOfWork ------------------------------------

    async def test_begin_first_time_returns_a_unit(self, persistence: Persistence) -> None:
        """UnitOfWorkFactory.begin: the first attempt on a message gets an open unit."""
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        await unit.rollback()

    async def test_begin_after_commit_returns_none(self, persistence: Persistence) -> None:
        """UnitOfWork.commit: the inbox row is durable, so a later begin of the same message gets None."""
        handler, message_id = unique("handler"), unique("msg")
        unit = await persistence.units.begin(handler, message_id)
        assert unit is not None
        await unit.commit([])
        assert await persistence.units.begin(handler, message_id) is None

    async def test_begin_after_rollback_returns_a_unit(self, persistence: Persistence) -> None:
        """UnitOfWork.rollback: the inbox row goes too, so a later begin gets a unit."""
        handler, message_id = unique("handler"), unique("msg")
        unit = await persistence.units.begin(handler, message_id)
        assert unit is not None
        await unit.rollback()
        again = await persistence.units.begin(handler, message_id)
        assert again is not None
        await again.rollback()

    async def test_begin_same_message_for_another_handler_returns_a_unit(self, persistence: Persistence) -> None:
        """UnitOfWorkFactory.begin: inbox rows are per (handler, message id); handlers are independent."""
        message_id = unique("msg")
        unit = await persistence.units.begin(unique("handler"), message_id)
        assert unit is not None
        await unit.commit([])
        other = await persistence.units.begin(unique("handler"), message_id)
        assert other is not None
        await other.rollback()

    async def test_begin_concurrent_with_open_unit_waits_then_returns_none(self, persistence: Persistence) -> None:
        """UnitOfWorkFactory.begin: a concurrent attempt on the same message waits for the open one.

        Once the open unit commits, the waiting begin sees its inbox row.
        """
        handler, message_id = unique("handler"), unique("msg")
        first = await persistence.units.begin(handler, message_id)
        assert first is not None
        second = asyncio.create_task(persistence.units.begin(handler, message_id))
        try:
            done, _ = await asyncio.wait({second}, timeout=self.blocked_for)
            waited = not done
        finally:
            await first.commit([])
            late = await asyncio.wait_for(second, self.timeout)
            if late is not None:
                await late.rollback()
        assert (waited, late) == (True, None)

    async def test_begin_two_concurrent_attempts_exactly_one_gets_a_unit(self, persistence: Persistence) -> None:
        """UnitOfWorkFactory.begin: of two racing attempts that both commit, exactly one gets a unit."""
        handler, message_id = unique("handler"), unique("msg")

        async def attempt() -> bool:
            unit = await persistence.units.begin(handler, message_id)
            if unit is None:
                return False
            # Hold the row a moment so the other attempt is waiting when this one commits
            # (the winner never waits for the loser, so this cannot deadlock).
            await asyncio.sleep(0.1)
            await unit.commit([])
            return True

        results = await asyncio.wait_for(asyncio.gather(attempt(), attempt()), self.timeout)
        assert sorted(results) == [False, True]

    async def test_commit_writes_outgoing_to_the_outbox_in_order(
        self, persistence: Persistence, outbox_topics: OutboxTopics
    ) -> None:
        """UnitOfWork.commit: the outgoing messages are written to the outbox, in order."""
        messages = [
            Outgoing("orders.a", new_envelope()),
            Outgoing("orders.b", new_envelope()),
            Outgoing("orders.a", new_envelope()),
        ]
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        await unit.commit(messages)
        assert await outbox_topics() == [(m.topic, m.envelope.id) for m in messages]

    async def test_rollback_writes_no_outgoing(self, persistence: Persistence, outbox_topics: OutboxTopics) -> None:
        """UnitOfWork.rollback: nothing of the attempt reaches the outbox, even rows it added itself."""
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        await persistence.outbox.add(unit.tx, "orders.a", new_envelope())
        await unit.rollback()
        assert await outbox_topics() == []

    async def test_commit_includes_writes_made_through_tx(
        self, persistence: Persistence, outbox_topics: OutboxTopics
    ) -> None:
        """UnitOfWork.tx: writes made in the unit's transaction commit with it."""
        event = new_envelope()
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        await persistence.outbox.add(unit.tx, "orders.a", event)
        await unit.commit([])
        assert await outbox_topics() == [("orders.a", event.id)]

    async def test_commit_duplicate_outgoing_id_raises_store_error(self, persistence: Persistence) -> None:
        """UnitOfWork.commit: the database refusing an outgoing row raises StoreError."""
        event = new_envelope()
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        with pytest.raises(errors.StoreError):
            await unit.commit([Outgoing("orders.a", event), Outgoing("orders.a", event)])

    async def test_commit_failure_leaves_no_inbox_row(self, persistence: Persistence) -> None:
        """UnitOfWork.commit: when it fails nothing committed, so a later begin gets a unit."""
        handler, message_id, event = unique("handler"), unique("msg"), new_envelope()
        unit = await persistence.units.begin(handler, message_id)
        assert unit is not None
        with pytest.raises(errors.StoreError):
            await unit.commit([Outgoing("orders.a", event), Outgoing("orders.a", event)])
        again = await persistence.units.begin(handler, message_id)
        assert again is not None
        await again.rollback()

    async def test_unit_event_append_commits_with_the_unit(self, persistence: Persistence) -> None:
        """UnitOfWork.events: appends join the unit's transaction and commit with it."""
        stream = unique("stream")
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        await unit.events.append(stream, [new_event()], expected_version=0)
        await unit.commit([])
        assert [e.version for e in await persistence.events.read_stream(stream)] == [1]

    async def test_unit_event_append_rolls_back_with_the_unit(self, persistence: Persistence) -> None:
        """UnitOfWork.events: appends join the unit's transaction and roll back with it."""
        stream = unique("stream")
        unit = await persistence.units.begin(unique("handler"), unique("msg"))
        assert unit is not None
        await unit.events.append(stream, [new_event()], expected_version=0)
        await unit.rollback()
        assert await persistence.events.read_stream(stream) == []

    async def test_rollback_twice_does_not_raise(self, persistence: Persistence) -> None:
        """UnitOfWork.rollback: idempotent; a second call is a no-op and never raises."""
        handler, message_id = unique("handler"), unique("msg")
        unit = await persistence.units.begin(handler, message_id)
        assert unit is not None
        await unit.rollback()
        await unit.rollback()
        assert not await inbox_has(persistence, handler, message_id)

    # -- OutboxWriter.add ------------------------------------------------------

    async def test_outbox_add_row_visible_after_commit(
        self, persistence: Persistence, outbox_topics: OutboxTopics
    ) -> None:
        """OutboxWriter.add: the row is stored once the caller's transaction commits."""
        async with persistence.database.transaction() as tx:
            added = await persistence.outbox.add(tx, "orders.a", {"order_id": "o-1"})
        assert await outbox_topics() == [("orders.a", added.id)]

    async def test_outbox_add_row_absent_after_rollback(
        self, persistence: Persistence, outbox_topics: OutboxTopics
    ) -> None:
        """OutboxWriter.add: the row joins the caller's transaction; a rollback drops it."""
        with pytest.raises(CallerError):
            await raise_in_transaction(
                persistence, lambda tx: persistence.outbox.add(tx, "orders.a", {"order_id": "o-1"}), CallerError()
            )
        assert await outbox_topics() == []

    async def test_outbox_add_duplicate_message_id_raises_store_error(self, persistence: Persistence) -> None:
        """OutboxWriter.add: an envelope whose id is stored already is refused with StoreError."""
        event = new_envelope()
        async with persistence.database.transaction() as tx:
            await persistence.outbox.add(tx, "orders.a", event)
        with pytest.raises(errors.StoreError):
            async with persistence.database.transaction() as tx:
                await persistence.outbox.add(tx, "orders.a", event)

    async def test_outbox_add_envelope_keeps_its_id(
        self, persistence: Persistence, outbox_topics: OutboxTopics
    ) -> None:
        """OutboxWriter.add: an Envelope passed as data is kept; its id is the message id."""
        event = new_envelope()
        async with persistence.database.transaction() as tx:
            added = await persistence.outbox.add(tx, "orders.a", event)
        assert (added.id, await outbox_topics()) == (event.id, [("orders.a", event.id)])
