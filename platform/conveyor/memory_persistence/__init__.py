"""Every persistence port in memory: the runtime with no threads, no I/O and no SQL.

:func:`memory_persistence` builds a :class:`~conveyor.persistence.Persistence`
on a :class:`MemoryDatabase`. It passes the same conformance suite as the SQL
stores (:class:`conveyor.testing.PersistenceConformance`): transactions buffer
their writes and apply them atomically at commit, a savepoint undoes its part,
and a write locks its row until the transaction ends, so the inbox row of an
open unit of work makes a concurrent attempt on the same message wait, as a
unique key does. Nothing survives the process: for tests and simulations.

Handlers reach the transaction as ``tx.session`` (a :class:`MemoryTx`) and
may keep their own rows in it (``await tx.session.put("ledger", key, value)``):
they commit or roll back with the inbox row and the outbox.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from conveyor import persistence
from conveyor.memory_persistence.handling import (
    MemoryEvents,
    MemoryInbox,
    MemoryOutbox,
    MemoryUnitOfWork,
    MemoryUnits,
    OutboxRow,
)
from conveyor.memory_persistence.records import (
    MemoryDeadLetterStore,
    MemoryHeartbeatStore,
    MemorySagaStore,
    MemoryScheduleStore,
)
from conveyor.memory_persistence.relay_store import InFlight, MemoryOutboxStore
from conveyor.memory_persistence.tables import Fault, MemoryDatabase, MemoryTx, system_now

__all__ = [
    "Fault",
    "MemoryDatabase",
    "MemoryOutboxStore",
    "MemoryTx",
    "MemoryUnitOfWork",
    "OutboxRow",
    "memory_persistence",
]


def memory_persistence(
    source: str = "conveyor",
    *,
    db: MemoryDatabase | None = None,
    now: Callable[[], datetime] = system_now,
    fault: Fault | None = None,
) -> persistence.Persistence:
    """Every store of one in-memory database behind Conveyor's persistence ports.

    Args:
        source: CloudEvents ``source`` of messages built from plain data.
        db: the database to use (a new one if None: ``now`` and ``fault`` configure it).
        now: the database clock.
        fault: the fault hook (see :mod:`conveyor.memory_persistence.tables`).
    """
    database = db if db is not None else MemoryDatabase(now, fault)
    outbox = MemoryOutbox(database, source)
    events = MemoryEvents(database)
    inbox = MemoryInbox(database)
    sagas = MemorySagaStore(database)
    flight = database.shared.setdefault("relay_claims", InFlight())
    return persistence.Persistence(
        database=database,
        units=MemoryUnits(database, inbox, outbox, events, sagas),
        outbox=outbox,
        inbox=inbox,
        events=events,
        schedules=MemoryScheduleStore(database),
        dead_letters=MemoryDeadLetterStore(database),
        sagas=sagas,
        relay_store=lambda: MemoryOutboxStore(database, flight),
        heartbeats=MemoryHeartbeatStore(database),
    )
