"""Conveyor's error tree.

Everything Conveyor raises derives from :class:`ConveyorError`. Categories say
what went wrong and, through :attr:`ConveyorError.retryable`, whether trying
again can help; code never matches on message strings. Driver errors
(aiokafka, aio-pika, nats-py, SQLAlchemy) are translated into this tree inside
the adapter that talks to the driver, with ``raise ... from exc``.

The outcome signals :class:`Retry` and :class:`Reject` are not failures: a
handler raises them to tell the worker what to do with the message.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


class ConveyorError(Exception):
    """Root of every error Conveyor raises."""

    retryable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())


class ConfigurationError(ConveyorError, ValueError):
    """The configuration or a registration is invalid; fix it and start again."""


class NotFound(ConveyorError, LookupError):
    """A named thing (handler, schedule, message) does not exist."""


class TransportError(ConveyorError):
    """The broker refused or failed an operation."""


class NotDeclared(TransportError):
    """The subscription or topic an operation names is not declared on the broker (nothing was created)."""


class TransientTransportError(TransportError):
    """The broker is unreachable or busy; the operation may succeed if retried."""

    retryable = True


class PublishManyError(TransportError):
    """Some messages of a :meth:`~conveyor.Publisher.publish_many` were refused; the rest were confirmed.

    Attributes:
        sent: the events the broker confirmed.
        failed: each refused event with its error, in the order given.
    """

    def __init__(self, sent: list[Any], failed: list[tuple[Any, Exception]]) -> None:
        first = failed[0][1]
        super().__init__(
            f"{len(failed)} of {len(sent) + len(failed)} messages were refused (the first: {first}); "
            "the refused events are in .failed: publish them again once the cause is fixed"
        )
        self.sent = sent
        self.failed = failed


class StoreError(ConveyorError):
    """The database refused or failed an operation."""


class StoreUnavailable(StoreError):
    """The database is unreachable or busy; the operation may succeed if retried.

    An outage of the service's own infrastructure, not a message's fault: a
    worker that meets it holds the message and tries again when the database
    answers, without spending the message's attempts.
    """

    retryable = True


class ConcurrencyConflict(StoreError):
    """Someone else wrote first (an expected version did not match, a serialization failure, a deadlock).

    Retried with a bound of its own: reload and try again.
    """

    retryable = True


class StatementError(StoreError):
    """The database refused a statement: the statement's fault, not an outage.

    A constraint violation (SQLSTATE class 23), a data error (22), a syntax
    error or an undefined column (42), the statement's own timeout (57014):
    trying the same statement again fails the same way. A handler whose
    statement fails so spends an attempt, like any other handler error.

    Attributes:
        sqlstate: the PostgreSQL SQLSTATE, or ``"sqlite:<code name>"``, when known.
    """

    def __init__(self, message: str | None = None, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class InvalidMessage(ConveyorError, ValueError):
    """A message could not be decoded or validated; it is dead-lettered, never retried.

    Attributes:
        field: the CloudEvents attribute (or ``data``) at fault, when one is.
    """

    def __init__(self, message: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Retry(Exception):
    """Raised by a handler to have the message delivered again later.

    Counts as an attempt: after ``max_attempts`` the message is dead-lettered.

    Args:
        delay: how long to wait before the next delivery; ``None`` uses the
            handler's backoff policy.
        reason: a short text recorded in logs and, if it comes to that, in the
            dead-letter headers.
    """

    def __init__(self, delay: timedelta | float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if delay is not None and delay < 0:
            raise ValueError(f"Retry delay must not be negative, got {delay}")
        self.delay: float | None = delay
        self.reason = reason


class Reject(Exception):
    """Raised by a handler to send the message straight to dead letters.

    Use it for messages that can never succeed (an invalid order), so they do
    not burn retries.

    Args:
        reason: why the message is rejected; recorded in the dead-letter headers.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
