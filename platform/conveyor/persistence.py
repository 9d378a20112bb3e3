"""Persistence ports: what the runtime needs from the service's database.

The ``event_store`` package implements them on SQL (SQLite, PostgreSQL); the
runtime (worker, relay, scheduler, HTTP ingest, CLI) depends only on these
protocols, and the process assembly (:mod:`conveyor.runtime.app`) is the one
place that builds the SQL implementations. :class:`conveyor.testing.PersistenceConformance`
is the contract every implementation passes.

``tx`` arguments are an open transaction handle obtained from
:meth:`Database.transaction` (with the SQL stores, a SQLAlchemy
``AsyncSession``): a port that must join the caller's transaction takes it as
an argument; there is no ambient session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from conveyor import envelope, stores
from conveyor.heartbeats import HeartbeatStore
from conveyor.sagas.store import SagaStore

AddOutcome = Literal["added", "duplicate", "conflict"]
"""What :meth:`OutboxWriter.add_once` did: ``added`` (a new row), ``duplicate`` (the id is stored
for the same topic and source; nothing changed) or ``conflict`` (the id is stored for another topic
or source; nothing changed)."""

RunStatus = Literal["claimed", "started", "succeeded", "failed", "skipped"]
"""What became of a schedule fire: ``claimed`` -> ``started`` -> ``succeeded``/``failed``, or ``skipped``."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message published during a handler attempt, written to the outbox when the attempt commits.

    Attributes:
        topic: destination topic.
        envelope: the event.
        delay: publish no earlier than this long after the commit.
        at: publish no earlier than this aware time.
    """

    topic: str
    envelope: envelope.Envelope
    delay: timedelta | float | None = None
    at: datetime | None = None


class Database(Protocol):
    """Transactions on the service's database."""

    def transaction(self, *, readonly: bool = False) -> AbstractAsyncContextManager[Any]:
        """Open a transaction and yield its handle; commit when the block exits normally.

        If the block raises, the transaction is rolled back and the exception
        propagates unchanged, except that errors the database itself raised
        inside the block are translated into :class:`~conveyor.errors.StoreError`.
        An exception of the caller's own (an ``OSError`` from an HTTP call, say)
        is never reported as a database failure.

        Args:
            readonly: the transaction only reads (SQLite then takes no write lock).

        Raises:
            StoreError: the database failed to begin or commit
                (``retryable`` when it is unreachable or busy).
        """
        ...

    async def check(self) -> None:
        """Verify the database answers now (for readiness).

        Raises:
            StoreError: it does not, with the reason.
        """
        ...

    async def close(self) -> None:
        """Release every connection; idempotent."""
        ...

    def display_url(self) -> str:
        """The database URL with credentials hidden, for logs."""
        ...


class UnitOfWork(Protocol):
    """One handler attempt's database transaction.

    Opened by the attempt's first ``ctx.transaction()`` (or before the handler
    runs, for ``@on(..., transactional=True)``) with the inbox row of the
    message as its first write; committed once, after the handler returned,
    together with the attempt's outgoing messages; or rolled back.

    Attributes:
        tx: the transaction handle (a SQLAlchemy ``AsyncSession`` on SQL).
        events: the event store, writing in this transaction.
    """

    tx: Any
    events: Any

    @property
    def sagas(self) -> SagaStore:
        """The saga store (its methods take ``tx``)."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested scope: if its block raises, the block's writes are undone and the error propagates.

        Errors the database raised inside the block propagate as
        :class:`~conveyor.errors.StoreError` (a saga's local step tells an
        outage from its own failure by that).
        """
        ...

    async def commit(self, outgoing: Sequence[Outgoing]) -> None:
        """Write ``outgoing`` to the outbox, in order, and commit everything.

        Raises:
            StoreError: the database refused; nothing of the attempt committed.
        """
        ...

    async def rollback(self, error: BaseException | None = None) -> BaseException | None:
        """Undo the attempt's writes, including its inbox row; idempotent, never raises.

        Args:
            error: what ended the attempt, if anything.

        Returns:
            ``error`` as a :class:`~conveyor.errors.StoreError` when the
            database raised it (inside the handler, from a statement of the
            user's), so the caller can tell an outage from a handler bug;
            otherwise None.
        """
        ...


class UnitOfWorkFactory(Protocol):
    """Opens handler attempts' units of work."""

    async def begin(self, handler: str, message_id: str) -> UnitOfWork | None:
        """Open a transaction whose first write is the inbox row ``(handler, message_id)``.

        Concurrency: a concurrent attempt on the same message waits for this
        one; exactly one of two attempts that both commit gets a unit.

        Returns:
            The open unit, or None when the inbox already has the row (the
            message was handled: a duplicate delivery; nothing is left open).

        Raises:
            StoreError: the database failed; nothing is left open.
        """
        ...

    async def check(self) -> None:
        """Verify the database answers now: the probe that proves an outage before a message is held.

        Raises:
            StoreError: it does not, with the reason.
        """
        ...


class OutboxWriter(Protocol):
    """Adds messages to the transactional outbox inside the caller's transaction."""

    async def add(
        self,
        tx: Any,
        topic: str,
        data: Any,
        /,
        *,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> envelope.Envelope:
        """Store a message for ``topic``; the relay publishes it after ``tx`` commits (and when due).

        ``data`` is a ready :class:`~conveyor.envelope.Envelope` (kept as it
        is: its id is the message id) or a payload to wrap in a new one.

        Ordering: rows with the same partition key are published in commit order.

        Returns:
            The stored envelope (its ``id`` is the message id).

        Raises:
            ConfigurationError: an invalid delay or time.
            StoreError: the database refused the row (a duplicate event id, say).
        """
        ...

    async def add_once(self, tx: Any, topic: str, event: envelope.Envelope, /) -> AddOutcome:
        """Store ``event`` unless its id is stored already: idempotent by event id.

        Deduplication lasts as long as the row (sent rows are purged after the
        retention period). Concurrency: of two calls with one id, one adds.

        Raises:
            StoreError: the database failed.
        """
        ...


class ScheduleStore(Protocol):
    """Schedule fire claims, run history and pause state.

    Each fire ``(schedule, UTC fire time)`` is claimed at most once, whatever
    the number of replicas racing for it. A run's status only moves forward:
    ``claimed`` -> ``started`` -> ``succeeded`` | ``failed``; ``failed`` ->
    ``started`` (a retry); ``started`` -> ``started`` (a redelivery after a
    crash, once the crashed attempt's lease ran out); ``succeeded`` and
    ``skipped`` are final. A started run is held by one owner (a job attempt)
    until its lease, by the database clock, runs out.
    """

    async def now(self, tx: Any) -> datetime:
        """The database clock (aware UTC): the clock that decides what is due."""
        ...

    async def claim(
        self, tx: Any, schedule: str, fire_time: datetime, *, status: RunStatus, claimed_by: str
    ) -> int | None:
        """Claim a fire in ``tx``; return the run id, or None if it was claimed already."""
        ...

    async def start(
        self, tx: Any, run_id: int, *, owner: str | None = None, lease: timedelta = timedelta(seconds=30)
    ) -> bool:
        """Start a run for ``owner``, held for ``lease``; return whether the caller may run the job.

        Concurrency: of concurrent callers at most one starts the run. A
        claimed or failed run starts; a started run only once its lease ran
        out; a succeeded or skipped run never does.
        """
        ...

    async def renew(self, tx: Any, run_id: int, owner: str, lease: timedelta) -> bool:
        """Extend ``owner``'s lease to ``lease`` from now; False if the run is no longer started by ``owner``."""
        ...

    async def finish(
        self,
        tx: Any,
        run_id: int,
        status: Literal["succeeded", "failed"],
        error: str | None = None,
        *,
        owner: str | None = None,
    ) -> bool:
        """Record a run's outcome; return whether it was recorded.

        A run that already succeeded stays succeeded. With ``owner``, only a run
        started by ``owner`` and not taken over since is finished.
        """
        ...

    async def run(self, tx: Any, run_id: int) -> Run | None:
        """One run by id, or None (never claimed, or purged)."""
        ...

    async def last_fire(self, tx: Any, schedule: str) -> datetime | None:
        """The latest claimed fire time of ``schedule`` (any status), or None."""
        ...

    async def running_since(self, tx: Any, schedule: str, started_after: datetime) -> bool:
        """True if a run claimed after ``started_after`` is claimed or started and not finished."""
        ...

    async def states(self, tx: Any) -> dict[str, ScheduleState]:
        """Pause state of every schedule that was ever paused."""
        ...

    async def set_paused(self, tx: Any, schedule: str, paused: bool) -> None:
        """Pause or resume ``schedule`` for every replica (resuming records the database time)."""
        ...

    async def history(self, tx: Any, schedule: str, limit: int = 10) -> list[Run]:
        """The latest runs of ``schedule``, newest first."""
        ...

    async def purge(self, tx: Any, older_than: timedelta) -> int:
        """Delete finished runs older than ``older_than`` (each schedule's latest is kept)."""
        ...


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """Whether a schedule is paused, and since when it runs again."""

    paused: bool
    resumed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Run:
    """One fire of a schedule and what became of it.

    ``owner`` is the job attempt that last started it, ``lease_until`` until
    when that attempt holds it (database clock).
    """

    id: int
    schedule: str
    fire_time: datetime
    status: str
    claimed_by: str | None
    claimed_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    owner: str | None = None
    lease_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class HeldMessage:
    """A dead letter the broker refused, held in the database instead.

    Attributes:
        id: the row's id.
        topic: the dead-letter topic it was meant for.
        message: the dead letter (``conveyor-dlq-*`` headers included).
        held_at: when it was stored (aware UTC).
    """

    id: int
    topic: str
    message: envelope.WireMessage
    held_at: datetime


class DeadLetterStore(Protocol):
    """Dead letters the broker refused for good, kept where they cannot be refused.

    A dead-letter publish that the broker refuses (not an outage: the message
    itself, say a header it will never accept) would otherwise leave the
    message looping or lost; the worker stores it here and settles it.
    """

    async def hold(self, topic: str, message: envelope.WireMessage) -> None:
        """Store a dead letter for ``topic`` in a transaction of its own.

        Raises:
            StoreError: the database failed (the caller then leaves the message to the broker).
        """
        ...

    async def held(self, topic: str, limit: int = 100) -> list[HeldMessage]:
        """Dead letters held for ``topic``, oldest first."""
        ...

    async def release(self, ids: Sequence[int]) -> int:
        """Delete held dead letters (replayed or purged); return how many."""
        ...


@dataclass(frozen=True, slots=True)
class Persistence:
    """Every store of one database, as the runtime uses them.

    Attributes:
        database: transactions, readiness and shutdown.
        units: handler attempts' units of work (``ctx.transaction()``).
        outbox: adds messages in the caller's transaction.
        inbox: which messages each handler has processed.
        events: event streams.
        schedules: schedule claims and runs.
        dead_letters: dead letters the broker refused, held in the database.
        sagas: saga instances and step logs (its methods take ``tx``).
        relay_store: builds the relay's side of the outbox (one per relay).
        heartbeats: the live processes' heartbeats (the console's workers page).
    """

    database: Database
    units: UnitOfWorkFactory
    outbox: OutboxWriter
    inbox: stores.InboxStore
    events: stores.EventStore
    schedules: ScheduleStore
    dead_letters: DeadLetterStore
    sagas: SagaStore
    relay_store: Callable[[], stores.OutboxStore]
    heartbeats: HeartbeatStore
