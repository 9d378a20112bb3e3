"""Deliberately broken variants: each patches one guarantee away while the simulation runs.

The simulation must catch every one of them (``python -m tests.simulation
--variant NAME --seeds N`` reports after how many seeds it first failed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from conveyor import errors, persistence, ports, stores
from conveyor.memory_persistence.handling import INBOX, MemoryInbox
from conveyor.memory_persistence.records import RUNS, MemoryScheduleStore
from conveyor.memory_persistence.tables import MemoryTx
from conveyor.runtime import handling, relay_waves

from tests.simulation.world import World

Variant = Callable[[World], AbstractContextManager[None]]
VARIANTS: dict[str, Variant] = {}


def variant(name: str) -> Callable[[Variant], Variant]:
    """Register a broken variant under ``name``."""

    def register(func: Variant) -> Variant:
        VARIANTS[name] = func
        return func

    return register


@contextlib.contextmanager
def patched(owner: Any, attribute: str, value: Any) -> Iterator[None]:
    """Set ``owner.attribute`` to ``value`` for the block."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


@variant("inbox-removed")
def inbox_removed(world: World) -> AbstractContextManager[None]:
    """The inbox check removed: a redelivered message is handled again."""

    async def claim(self: MemoryInbox, tx: MemoryTx, handler: str, message_id: str) -> bool:
        await self.db.lock(tx, INBOX, (handler, message_id))
        tx.writes.setdefault(INBOX, {})[(handler, message_id)] = self.db.now()
        return True

    return patched(MemoryInbox, "claim", claim)


class _Settled:
    """A delivery already acked: later acks and nacks do nothing."""

    def __init__(self, delivery: ports.Delivery) -> None:
        self.topic, self.message, self.attempt = delivery.topic, delivery.message, delivery.attempt

    async def ack(self) -> None:
        """Nothing: acked already."""

    async def nack(self, delay: float) -> None:
        """Nothing: acked already."""


@variant("ack-before-commit")
def ack_before_commit(world: World) -> AbstractContextManager[None]:
    """The delivery acked before the handler ran and committed: a crash or a failure loses it."""
    original = handling.HandlerRunner.process

    async def process(self: handling.HandlerRunner, delivery: ports.Delivery) -> None:
        try:
            await delivery.ack()
        except errors.TransportError:
            return
        await original(self, _Settled(delivery))

    return patched(handling.HandlerRunner, "process", process)


@variant("statement-error-as-outage")
def statement_error_as_outage(world: World) -> AbstractContextManager[None]:
    """The old classification: a statement the database refused reported as an outage (held, never spent)."""

    def classify(exc: errors.StoreError) -> errors.StoreError:
        return errors.StoreUnavailable(str(exc)) if isinstance(exc, errors.StatementError) else exc

    return patched(world.faults, "classify", classify)


@variant("outage-as-statement-error")
def outage_as_statement_error(world: World) -> AbstractContextManager[None]:
    """The other misclassification: an outage reported as the statement's fault (it spends attempts)."""

    def classify(exc: errors.StoreError) -> errors.StoreError:
        return errors.StatementError(str(exc)) if isinstance(exc, errors.StoreUnavailable) else exc

    return patched(world.faults, "classify", classify)


class _FailuresAsSent:
    """An outbox batch that records a refused or interrupted publish as sent."""

    def __init__(self, batch: stores.OutboxBatch) -> None:
        self._batch = batch
        self.messages = batch.messages

    def sent(self, message: stores.OutboxMessage) -> None:
        self._batch.sent(message)

    def failed(self, message: stores.OutboxMessage, error: str, retry_in: float) -> None:
        self._batch.sent(message)

    def parked(self, message: stores.OutboxMessage, error: str) -> None:
        self._batch.sent(message)

    def interrupted(self, message: stores.OutboxMessage, error: str) -> None:
        self._batch.sent(message)


@variant("relay-marks-failed-sent")
def relay_marks_failed_sent(world: World) -> AbstractContextManager[None]:
    """The relay marks a row sent without the broker's confirmation."""
    original = relay_waves.WavePublisher.publish

    async def publish(self: relay_waves.WavePublisher, batch: stores.OutboxBatch) -> relay_waves.RoundResult:
        return await original(self, _FailuresAsSent(batch))

    return patched(relay_waves.WavePublisher, "publish", publish)


@variant("inbox-unlocked")
def inbox_unlocked(world: World) -> AbstractContextManager[None]:
    """The inbox checked but not locked: two concurrent deliveries of one message both pass it."""

    async def claim(self: MemoryInbox, tx: MemoryTx, handler: str, message_id: str) -> bool:
        if (handler, message_id) in self.db.table(INBOX):
            return False
        tx.writes.setdefault(INBOX, {})[(handler, message_id)] = self.db.now()
        return True

    return patched(MemoryInbox, "claim", claim)


@variant("cron-claim-not-unique")
def cron_claim_not_unique(world: World) -> AbstractContextManager[None]:
    """A schedule fire claimed without its unique key: schedulers racing for one fire both run it."""

    async def claim(
        self: MemoryScheduleStore,
        tx: MemoryTx,
        schedule: str,
        fire_time: datetime,
        *,
        status: persistence.RunStatus,
        claimed_by: str,
    ) -> int | None:
        run_id = next(self.db.ids)
        at = fire_time.astimezone(UTC)
        await tx.put(
            RUNS, run_id, persistence.Run(run_id, schedule, at, status, claimed_by, self.db.now(), None, None, None)
        )
        return run_id

    return patched(MemoryScheduleStore, "claim", claim)


@variant("redelivery-limit-blind")
def redelivery_limit_blind(world: World) -> AbstractContextManager[None]:
    """A copy delivered past ``max_attempts`` dead-lettered without asking the inbox (an applied message too)."""

    async def applied_before(self: handling.HandlerRunner, delivery: ports.Delivery) -> bool:
        return False

    return patched(handling.HandlerRunner, "_applied_before", applied_before)
