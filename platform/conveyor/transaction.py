"""``ctx.transaction()``: the handler's writes, its inbox mark and its outgoing messages, committed together."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from conveyor import envelope, persistence, stores

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


class AlreadyHandled(BaseException):
    """The message was already handled by this handler (the inbox has it); nothing is run again.

    A ``BaseException`` so that a handler's ``except Exception`` cannot swallow
    it and carry on with effects that were already applied.
    """


class StreamWriter(Protocol):
    """The event store, inside a handler's transaction (``tx.events``)."""

    async def append(self, stream_id: str, events: Sequence[stores.NewEvent], *, expected_version: int | None) -> int:
        """Append events to a stream in this transaction; return the stream's new version.

        Raises:
            ConcurrencyConflict: the stream is not at ``expected_version`` (0: it must be new).
            StoreError: the database failed.
        """
        ...

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[stores.RecordedEvent]:
        """The stream's events after ``after_version``, oldest first."""
        ...


class Transaction:
    """The handler attempt's database transaction, from ``async with ctx.transaction() as tx``.

    The inbox row ``(handler, message id)`` was its first write: a duplicate
    delivery never gets this far. The transaction stays open until the handler
    returns: leaving the ``async with`` block does not commit, a second
    ``ctx.transaction()`` joins the same transaction, and a failure anywhere in
    the attempt rolls everything back. Messages published with :meth:`publish`
    (or ``ctx.publish``) are written to the outbox in it and sent by the relay
    after the commit, so a rolled-back attempt sends nothing.

    Attributes:
        session: the SQLAlchemy ``AsyncSession`` of the transaction, for your writes.
        events: the event store, writing in this same transaction.
    """

    __slots__ = ("_build", "_outgoing", "events", "session")

    def __init__(
        self,
        session: AsyncSession,
        events: StreamWriter,
        build: Callable[..., envelope.Envelope],
        outgoing: list[persistence.Outgoing],
    ) -> None:
        self.session = session
        self.events = events
        self._build = build
        self._outgoing = outgoing

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
        extensions: Mapping[str, str] | None = None,
    ) -> envelope.Envelope:
        """Publish a message if, and only if, the attempt commits.

        Args:
            topic: destination topic.
            data: a pydantic model, a JSON-compatible value or bytes.
            key: ordering key; messages with the same key are published in order.
            type: CloudEvents type (default: the topic).
            headers: extra transport headers.
            delay: publish no earlier than this long after the commit.
            at: publish no earlier than this aware time.
            extensions: CloudEvents extension attributes (lower-case names).

        Returns:
            The envelope that will be sent.

        Raises:
            ConfigurationError: invalid topic or data, or both ``delay`` and ``at``.
        """
        from conveyor import errors

        if delay is not None and at is not None:
            raise errors.ConfigurationError("give either delay or at, not both")
        event = self._build(topic, data, key=key, type=type, headers=headers, extensions=extensions)
        self._outgoing.append(persistence.Outgoing(topic, event, delay, at))
        return event
