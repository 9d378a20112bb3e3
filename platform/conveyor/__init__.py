"""Conveyor: event handlers and cron jobs on Kafka, RabbitMQ or NATS JetStream.

The public API. Everything not listed in ``__all__`` is internal.
"""

from conveyor.context import Context
from conveyor.envelope import Envelope
from conveyor.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    ConveyorError,
    InvalidMessage,
    NotFound,
    PublishManyError,
    Reject,
    Retry,
    StatementError,
    StoreError,
    StoreUnavailable,
    TransientTransportError,
    TransportError,
)
from conveyor.publisher import Publisher
from conveyor.registry import Handler, Registry, on
from conveyor.retry import RetryPolicy
from conveyor.sagas.definition import Saga
from conveyor.scheduling.schedules import Schedule, cron, every
from conveyor.stores import NewEvent, RecordedEvent
from conveyor.transaction import Transaction

__all__ = [
    "ConcurrencyConflict",
    "ConfigurationError",
    "Context",
    "ConveyorError",
    "Envelope",
    "Handler",
    "InvalidMessage",
    "NewEvent",
    "NotFound",
    "PublishManyError",
    "Publisher",
    "RecordedEvent",
    "Registry",
    "Reject",
    "Retry",
    "RetryPolicy",
    "Saga",
    "Schedule",
    "StatementError",
    "StoreError",
    "StoreUnavailable",
    "Transaction",
    "TransientTransportError",
    "TransportError",
    "cron",
    "every",
    "on",
]
