"""What the console reads and acts on: ports only, handed over by the process assembly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor import persistence, ports, registry
from conveyor.stores import OutboxStore

Scaling = Callable[[], Mapping[str, Any]]
"""The autoscaling signal's snapshot (``GET /scaling``'s body); never blocks."""


@dataclass(frozen=True, slots=True)
class Sources:
    """The stores, broker and application a console shows.

    Attributes:
        service: the service's name (the CloudEvents ``source`` of what the console sends).
        app: the application's handlers, schedules and sagas.
        stores: the service's persistence ports.
        outbox: the outbox's operator side (stats, entries, retry, purge).
        open_transport: a new, unconnected transport to the broker. Dead letters
            are browsed on a connection of their own, closed afterwards: closing
            it is what gives the broker back the letters a peek took.
        scaling: the worker's autoscaling snapshot, where the process has a worker.
        transport: the process's connected transport, for read-only backlog figures
            (the dead letters waiting per topic); never used to consume.
    """

    service: str
    app: registry.Registry
    stores: persistence.Persistence
    outbox: OutboxStore
    open_transport: Callable[[], ports.Transport]
    scaling: Scaling | None = None
    transport: ports.Transport | None = None

    def dead_letter_topics(self) -> list[str]:
        """Topics whose dead letters a worker of this application keeps, sorted."""
        topics = {h.topic for h in self.app.handlers} | {s.topic for s in self.app.schedules}
        return sorted(topics)
