"""``ctx.transaction()``: the handler's writes, its inbox mark and its outgoing messages, committed together."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from conveyor import envelope, ports

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


class AlreadyHandled(Exception):
    """The message was already handled by this handler (the inbox has it); nothing is run again."""


@dataclass(slots=True)
class Pending:
    """A message published in a transaction, written to the outbox at commit."""

    topic: str
    envelope: envelope.Envelope
    delay: timedelta | float | None = None
    at: datetime | None = None


class StreamWriter(Protocol):
    """The event store, inside a handler's transaction (``tx.events``)."""

    async def append(self, stream_id: str, events: Sequence[ports.NewEvent], *, expected_version: int | None) -> int:
        """Append events to a stream in this transaction; return the stream's new version.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version`` (0: it must be new).
            StoreError: the database failed.
        """
        ...

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[ports.RecordedEvent]:
        """The stream's events after ``after_version``, oldest first."""
        ...


class Transaction:
    """One database transaction of a handler, from ``async with ctx.transaction() as tx``.

    The inbox row ``(handler, message id)`` was inserted first: a duplicate
    delivery never gets this far. Messages published with :meth:`publish` are
    written to the outbox in the same transaction and sent by the relay after
    the commit, so a rolled-back transaction sends nothing.

    Attributes:
        session: the SQLAlchemy ``AsyncSession`` of the transaction, for your writes.
        events: the event store, writing in this same transaction.
    """

    __slots__ = ("_build", "events", "pending", "session")

    def __init__(self, session: AsyncSession, build: Callable[..., envelope.Envelope], events: StreamWriter) -> None:
        self.session = session
        self.events = events
        self._build = build
        self.pending: list[Pending] = []

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = None,
        type: str | None = None,  # noqa: A002 - the CloudEvents attribute name
        headers: Mapping[str, str] | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> envelope.Envelope:
        """Publish a message if, and only if, this transaction commits.

        Args:
            topic: destination topic.
            data: a pydantic model, a JSON-compatible value or bytes.
            key: ordering key; messages with the same key are published in order.
            type: CloudEvents type (default: the topic).
            headers: extra transport headers.
            delay: publish no earlier than this long after the commit.
            at: publish no earlier than this aware time.

        Returns:
            The envelope that will be sent.

        Raises:
            ConfigurationError: invalid topic or data, or both ``delay`` and ``at``.
        """
        from conveyor import errors

        if delay is not None and at is not None:
            raise errors.ConfigurationError("give either delay or at, not both")
        event = self._build(topic, data, key=key, type=type, headers=headers)
        self.pending.append(Pending(topic, event, delay, at))
        return event
