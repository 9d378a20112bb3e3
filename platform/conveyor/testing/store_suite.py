"""Conformance tests of the stores that need no unit of work: inbox, event store, schedule store.

Mixed into :class:`conveyor.testing.PersistenceConformance`; see that module
for how a backend subclasses the suite and what its fixtures must provide.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from conveyor import envelope, errors, stores
from conveyor.persistence import Persistence
from conveyor.testing.support import unique

OutboxTopics = Callable[[], Awaitable[list[tuple[str, str]]]]
"""Reads ``(topic, message_id)`` of every stored outbox row, in insertion order."""

T = TypeVar("T")

FIRE = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
"""A schedule fire time (any fixed aware time will do; each test has its own schedule)."""


class CallerError(Exception):
    """An error of the caller's own, raised inside a transaction to roll it back."""


def new_event(type_: str = "thing.happened", n: int = 1) -> stores.NewEvent:
    return stores.NewEvent(type=type_, data=f'{{"n": {n}}}'.encode())


def new_envelope(topic: str = "orders") -> envelope.Envelope:
    return envelope.create(topic, {"order_id": unique("o")}, source="conformance")


async def inbox_has(persistence: Persistence, handler: str, message_id: str) -> bool:
    """Whether the inbox holds a committed row ``(handler, message_id)``; the probe leaves nothing behind."""
    found: bool | None = None
    try:
        async with persistence.database.transaction() as tx:
            found = not await persistence.inbox.claim(tx, handler, message_id)
            raise CallerError  # roll the probe's own claim back
    except CallerError:
        pass
    assert found is not None
    return found


async def raise_in_transaction(
    persistence: Persistence, write: Callable[[Any], Awaitable[object]], error: BaseException
) -> None:
    """Open a transaction, run ``write(tx)`` in it, then raise ``error`` from the block."""
    async with persistence.database.transaction() as tx:
        await write(tx)
        raise error


async def poll_until(probe: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """Call ``probe`` until it returns a truthy value; return that value.

    Raises:
        AssertionError: it is still falsy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not (value := await probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


class StoreContracts:
    """The inbox, event store and schedule store clauses of the persistence contract."""

    #: seconds a test waits for a concurrent operation or a clock to move on.
    timeout: float = 10.0

    # -- InboxStore ------------------------------------------------------------

    async def test_inbox_claim_after_commit_returns_false(self, persistence: Persistence) -> None:
        """InboxStore.claim: once a claim committed, claiming the pair again returns False."""
        handler, message_id = unique("handler"), unique("msg")
        async with persistence.database.transaction() as tx:
            await persistence.inbox.claim(tx, handler, message_id)
        async with persistence.database.transaction() as tx:
            claimed = await persistence.inbox.claim(tx, handler, message_id)
        assert claimed is False

    async def test_inbox_claim_duplicate_leaves_the_transaction_usable(self, persistence: Persistence) -> None:
        """InboxStore.claim: after a False claim the transaction stays usable and commits its writes."""
        handler, message_id, stream = unique("handler"), unique("msg"), unique("stream")
        async with persistence.database.transaction() as tx:
            await persistence.inbox.claim(tx, handler, message_id)
        async with persistence.database.transaction() as tx:
            await persistence.inbox.claim(tx, handler, message_id)
            await persistence.events.append(stream, [new_event()], expected_version=0, tx=tx)
        assert [e.version for e in await persistence.events.read_stream(stream)] == [1]

    async def test_inbox_purge_keeps_rows_younger_than_the_retention(self, persistence: Persistence) -> None:
        """InboxStore.purge: rows processed less than ``older_than`` ago are kept."""
        handler, message_id = unique("handler"), unique("msg")
        async with persistence.database.transaction() as tx:
            await persistence.inbox.claim(tx, handler, message_id)
        purged = await persistence.inbox.purge(timedelta(days=1))
        assert (purged, await inbox_has(persistence, handler, message_id)) == (0, True)

    async def test_inbox_purge_deletes_rows_older_than_the_retention(self, persistence: Persistence) -> None:
        """InboxStore.purge: rows processed more than ``older_than`` ago are deleted and counted."""
        handler, message_id = unique("handler"), unique("msg")
        async with persistence.database.transaction() as tx:
            await persistence.inbox.claim(tx, handler, message_id)
        # The database clock decides: poll until it has moved past the row's time.
        purged = await poll_until(lambda: persistence.inbox.purge(timedelta(0)), self.timeout, "the inbox row to age")
        assert (purged, await inbox_has(persistence, handler, message_id)) == (1, False)

    # -- EventStore ------------------------------------------------------------

    async def test_append_new_stream_returns_the_new_version(self, persistence: Persistence) -> None:
        """EventStore.append: with expected_version=0 on a new stream, returns the new version."""
        version = await persistence.events.append(
            unique("stream"), [new_event(n=1), new_event(n=2)], expected_version=0
        )
        assert version == 2

    async def test_append_stale_expected_version_raises_concurrency_conflict(self, persistence: Persistence) -> None:
        """EventStore.append: a stream not at expected_version raises ConcurrencyConflict."""
        stream = unique("stream")
        await persistence.events.append(stream, [new_event(n=1), new_event(n=2)], expected_version=0)
        with pytest.raises(errors.ConcurrencyConflict):
            await persistence.events.append(stream, [new_event(n=3)], expected_version=1)

    async def test_read_stream_returns_versions_in_order(self, persistence: Persistence) -> None:
        """EventStore.read_stream: a stream's events, oldest first, numbered 1, 2, ..."""
        stream = unique("stream")
        await persistence.events.append(stream, [new_event(n=1), new_event(n=2)], expected_version=0)
        await persistence.events.append(stream, [new_event(n=3)], expected_version=2)
        recorded = await persistence.events.read_stream(stream)
        assert [(e.version, e.data) for e in recorded] == [(1, b'{"n": 1}'), (2, b'{"n": 2}'), (3, b'{"n": 3}')]

    async def test_read_stream_round_trips_type_metadata_and_time(self, persistence: Persistence) -> None:
        """EventStore.read_stream: type and metadata are kept; recorded_at is aware UTC."""
        stream = unique("stream")
        metadata: dict[str, Any] = {"correlationid": "c-1", "attempt": 2}
        await persistence.events.append(stream, [stores.NewEvent("order.placed", b"{}", metadata)], expected_version=0)
        (recorded,) = await persistence.events.read_stream(stream)
        assert (recorded.stream_id, recorded.type, dict(recorded.metadata), recorded.recorded_at.utcoffset()) == (
            stream,
            "order.placed",
            metadata,
            timedelta(0),
        )

    async def test_read_all_positions_increase_across_streams(self, persistence: Persistence) -> None:
        """EventStore.read_all: events of every stream in commit order, positions increasing."""
        first, second = unique("stream"), unique("stream")
        await persistence.events.append(first, [new_event()], expected_version=0)
        await persistence.events.append(second, [new_event()], expected_version=0)
        await persistence.events.append(first, [new_event()], expected_version=1)
        recorded = await persistence.events.read_all()
        positions = [e.position for e in recorded]
        assert positions == sorted(set(positions))
        assert [(e.stream_id, e.version) for e in recorded] == [(first, 1), (second, 1), (first, 2)]

    async def test_read_all_after_position_skips_earlier_events(self, persistence: Persistence) -> None:
        """EventStore.read_all: ``after`` resumes after the last position seen."""
        first, second = unique("stream"), unique("stream")
        await persistence.events.append(first, [new_event()], expected_version=0)
        (seen,) = await persistence.events.read_all()
        await persistence.events.append(second, [new_event()], expected_version=0)
        assert [e.stream_id for e in await persistence.events.read_all(after=seen.position)] == [second]

    async def test_append_in_callers_transaction_rolls_back_with_it(self, persistence: Persistence) -> None:
        """EventStore.append(tx=...): the append joins the caller's transaction and rolls back with it."""
        stream = unique("stream")
        with pytest.raises(CallerError):
            await raise_in_transaction(
                persistence,
                lambda tx: persistence.events.append(stream, [new_event()], expected_version=0, tx=tx),
                CallerError(),
            )
        assert await persistence.events.read_stream(stream) == []

    # -- ScheduleStore ---------------------------------------------------------

    async def _claim(self, persistence: Persistence, schedule: str, fire_time: datetime = FIRE) -> int | None:
        async with persistence.database.transaction() as tx:
            return await persistence.schedules.claim(tx, schedule, fire_time, status="claimed", claimed_by="suite")

    async def _claimed_run(self, persistence: Persistence) -> tuple[str, int]:
        schedule = unique("schedule")
        run_id = await self._claim(persistence, schedule)
        assert run_id is not None
        return schedule, run_id

    async def test_schedule_claim_same_fire_twice_returns_id_then_none(self, persistence: Persistence) -> None:
        """ScheduleStore.claim: each (schedule, fire time) is claimed once; the second claim gets None."""
        schedule = unique("schedule")
        first = await self._claim(persistence, schedule)
        second = await self._claim(persistence, schedule)
        assert (isinstance(first, int), second) == (True, None)

    async def test_schedule_start_claimed_run_returns_true(self, persistence: Persistence) -> None:
        """ScheduleStore.start: a claimed run may start."""
        _, run_id = await self._claimed_run(persistence)
        async with persistence.database.transaction() as tx:
            started = await persistence.schedules.start(tx, run_id)
        assert started is True

    async def test_schedule_start_succeeded_run_returns_false(self, persistence: Persistence) -> None:
        """ScheduleStore.start: a succeeded run is final and may not start again."""
        _, run_id = await self._claimed_run(persistence)
        async with persistence.database.transaction() as tx:
            await persistence.schedules.start(tx, run_id)
            await persistence.schedules.finish(tx, run_id, "succeeded")
        async with persistence.database.transaction() as tx:
            started = await persistence.schedules.start(tx, run_id)
        assert started is False

    async def test_schedule_start_failed_run_returns_true(self, persistence: Persistence) -> None:
        """ScheduleStore.start: a failed run may start again (a retry)."""
        _, run_id = await self._claimed_run(persistence)
        async with persistence.database.transaction() as tx:
            await persistence.schedules.start(tx, run_id)
            await persistence.schedules.finish(tx, run_id, "failed", "boom")
        async with persistence.database.transaction() as tx:
            started = await persistence.schedules.start(tx, run_id)
        assert started is True

    async def test_schedule_start_concurrent_callers_only_one_starts(self, persistence: Persistence) -> None:
        """ScheduleStore.start: of callers racing to start one run, exactly one may run it (it holds a lease)."""
        _, run_id = await self._claimed_run(persistence)

        async def start() -> bool:
            async with persistence.database.transaction() as tx:
                return await persistence.schedules.start(tx, run_id)

        started = await asyncio.gather(*(start() for _ in range(5)))
        assert sorted(started) == [False, False, False, False, True]

    async def test_schedule_start_run_whose_lease_ran_out_is_taken_over(self, persistence: Persistence) -> None:
        """ScheduleStore.start: a run whose lease ran out starts again; its old owner can no longer finish it."""
        schedule, run_id = await self._claimed_run(persistence)
        lease = timedelta(seconds=0.3)

        async def start(owner: str) -> bool:
            async with persistence.database.transaction() as tx:
                return await persistence.schedules.start(tx, run_id, owner=owner, lease=lease)

        assert await start("crashed")
        deadline = time.monotonic() + 10
        while not await start("next"):
            assert time.monotonic() < deadline, "the run was never taken over"
            await asyncio.sleep(0.05)
        async with persistence.database.transaction() as tx:
            renewed = await persistence.schedules.renew(tx, run_id, "crashed", lease)
            stale = await persistence.schedules.finish(tx, run_id, "failed", "late", owner="crashed")
            finished = await persistence.schedules.finish(tx, run_id, "succeeded", owner="next")
        async with persistence.database.transaction(readonly=True) as tx:
            (run,) = await persistence.schedules.history(tx, schedule)
        assert (renewed, stale, finished, run.status, run.owner) == (False, False, True, "succeeded", "next")

    async def test_schedule_finish_failed_after_succeeded_keeps_succeeded(self, persistence: Persistence) -> None:
        """ScheduleStore.finish: a run that succeeded stays succeeded."""
        schedule, run_id = await self._claimed_run(persistence)
        async with persistence.database.transaction() as tx:
            await persistence.schedules.start(tx, run_id)
            await persistence.schedules.finish(tx, run_id, "succeeded")
        async with persistence.database.transaction() as tx:
            await persistence.schedules.finish(tx, run_id, "failed", "late duplicate")
        async with persistence.database.transaction(readonly=True) as tx:
            (run,) = await persistence.schedules.history(tx, schedule)
        assert (run.status, run.error) == ("succeeded", None)

    async def test_schedule_history_lists_runs_newest_first(self, persistence: Persistence) -> None:
        """ScheduleStore.history: a schedule's runs, newest fire time first."""
        schedule = unique("schedule")
        fires = [FIRE + timedelta(minutes=m) for m in (1, 0, 2)]  # claimed out of order
        for fire in fires:
            await self._claim(persistence, schedule, fire)
        async with persistence.database.transaction(readonly=True) as tx:
            runs = await persistence.schedules.history(tx, schedule)
        assert [r.fire_time for r in runs] == sorted(fires, reverse=True)

    async def test_schedule_set_paused_round_trips_through_states(self, persistence: Persistence) -> None:
        """ScheduleStore.set_paused/states: a paused schedule reads back as paused."""
        schedule = unique("schedule")
        async with persistence.database.transaction() as tx:
            await persistence.schedules.set_paused(tx, schedule, True)
        async with persistence.database.transaction(readonly=True) as tx:
            states = await persistence.schedules.states(tx)
        assert states[schedule].paused is True

    async def test_schedule_now_is_aware_utc(self, persistence: Persistence) -> None:
        """ScheduleStore.now: the database clock as an aware UTC datetime."""
        async with persistence.database.transaction(readonly=True) as tx:
            now = await persistence.schedules.now(tx)
        assert now.utcoffset() == timedelta(0)
