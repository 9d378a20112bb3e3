"""The saga persistence port: instances with a version, and their step logs.

``event_store`` implements it on SQL; :class:`conveyor.testing.sagas.MemorySagaStore`
in memory. Every write takes the caller's transaction handle (``tx``): a saga
transition is saved in the same transaction as the inbox row of the message
that caused it and the outbox rows of the commands it sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from conveyor.sagas import engine


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """A stored instance and when it was created and last changed (aware UTC)."""

    instance: engine.Instance
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One stored line of an instance's step log."""

    at: datetime
    entry: engine.Entry


class SagaStore(Protocol):
    """Saga instances and their step logs.

    Concurrency: :meth:`save` is a compare-and-set on the version, so of two
    transitions computed from the same version, one is saved and the other
    raises :class:`~conveyor.errors.ConcurrencyConflict` (its transaction
    is rolled back and its message retried).
    """

    async def load(self, tx: Any, saga: str, instance_id: str) -> SagaRecord | None:
        """The instance, or None."""
        ...

    async def create(self, tx: Any, instance: engine.Instance) -> bool:
        """Insert a new instance (its version as given); False if ``(saga, id)`` exists (nothing changed).

        Raises:
            StoreError: the database failed.
        """
        ...

    async def save(self, tx: Any, instance: engine.Instance) -> None:
        """Replace the stored instance whose version is ``instance.version - 1``.

        Raises:
            ConcurrencyConflict: the stored version is another one (a concurrent transition won).
            StoreError: the database failed.
        """
        ...

    async def release_command(self, tx: Any, message_id: str) -> None:
        """Let a command be added to the outbox again under its id: remove the row an earlier send left.

        A saga re-sends an unanswered undo as the same message (the same id);
        the outbox keeps a sent message's id for its retention period, so the
        earlier row (sent, waiting or parked) is removed first.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def cancel_timer(self, tx: Any, message_id: str) -> None:
        """Delete the timer ``message_id`` from the outbox if it is still unsent; nothing if it was sent.

        The transition that moves an instance on cancels the timer it waited
        on, so an answered step's timeout is never published (no transaction,
        no step log line). A timer the relay is publishing right now is not
        deleted: it arrives, and its stale token makes it change nothing.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def log(self, tx: Any, saga: str, instance_id: str, entries: Sequence[engine.Entry]) -> None:
        """Append lines to the instance's step log."""
        ...

    async def find(
        self, tx: Any, *, saga: str | None = None, status: str | None = None, limit: int | None = 100
    ) -> list[SagaRecord]:
        """Instances, most recently changed first, optionally of one saga and status; ``limit`` None: all."""
        ...

    async def history(self, tx: Any, saga: str, instance_id: str, limit: int = 1000) -> list[LogRecord]:
        """The instance's step log, oldest first."""
        ...

    async def purge(self, tx: Any, older_than: timedelta, limit: int = 1000) -> int:
        """Delete at most ``limit`` finished instances unchanged for ``older_than``, with their step logs.

        Finished: ``completed`` or ``compensated`` (no signal changes them);
        a parked (``failed``) instance waits for an operator and stays.

        Raises:
            StoreError: the database failed.
        """
        ...

    async def counts(self, tx: Any) -> dict[tuple[str, str], int]:
        """How many instances each ``(saga, status)`` has."""
        ...
