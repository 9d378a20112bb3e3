"""The autoscaling signal of a worker: per handler, the broker's backlog, in-flight work and capacity.

A :class:`ScalingReporter` asks the broker for the backlog of every handler's
subscription every ``interval`` seconds, in the background, each query bounded
by ``timeout``: a slow or unreachable broker never slows ``/metrics`` or
``/scaling``, which serve the last figures. A failed query keeps the handler's
last figures, and ``/scaling`` shows the error and when the figures were read.

Gauges (label ``handler``): ``conveyor_backlog`` (messages waiting, from the
broker), ``conveyor_oldest_age_seconds`` (where the broker knows it),
``conveyor_capacity`` (the handler's concurrency in this process), beside
``conveyor_in_flight``. Every replica of a handler reports the same backlog
(it is the subscription's, not the process's): aggregate it with ``max``.

Gauge ``conveyor_dead_letters`` (label ``topic``): the dead letters each
consumed topic's keeper holds (:func:`conveyor.runtime.dead_letters.waiting`),
read every :data:`DEAD_LETTER_INTERVAL` seconds (the first refresh included),
with the same timeout; a topic whose count cannot be read keeps its last value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor import envelope, errors, ports, telemetry
from conveyor.runtime import dead_letters, worker

log = logging.getLogger("conveyor.scaling")

INTERVAL = 5.0
"""Seconds between two readings of the broker's backlogs."""
TIMEOUT = 3.0
"""Seconds one backlog query may take."""
DEAD_LETTER_INTERVAL = 30.0
"""Seconds between two readings of the dead-letter keepers' counts."""


@dataclass(slots=True)
class HandlerLoad:
    """The figures of one handler.

    Attributes:
        handler: the handler name.
        topic: its topic.
        capacity: messages it runs at once in this process.
        in_flight: messages its dispatcher holds now.
        backlog: the broker's figures at the last successful reading, if any.
        read_at: when they were read (aware UTC).
        error: why the last reading failed, if it did.
    """

    handler: str
    topic: str
    capacity: int
    in_flight: int = 0
    backlog: ports.Backlog | None = None
    read_at: datetime | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The handler's entry in ``GET /scaling``."""
        backlog = self.backlog
        return {
            "handler": self.handler,
            "topic": self.topic,
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "backlog": None if backlog is None else backlog.pending,
            "broker_in_flight": None if backlog is None else backlog.in_flight,
            "oldest_age_seconds": None if backlog is None else backlog.oldest_age_s,
            "read_at": None if self.read_at is None else envelope.format_time(self.read_at),
            "error": self.error,
        }


class ScalingReporter:
    """Keeps the backlog gauges of a worker's handlers current.

    Args:
        transport: the worker's connected transport.
        consumer: the worker.
        interval: seconds between readings.
        timeout: seconds one query may take.
    """

    def __init__(
        self,
        transport: ports.Transport,
        consumer: worker.Worker,
        *,
        interval: float = INTERVAL,
        timeout: float = TIMEOUT,
    ) -> None:
        self._transport = transport
        self._worker = consumer
        self._interval = interval
        self._timeout = timeout
        self._subscriptions = {s.name: s for s in consumer.subscriptions()}
        self._loads = {h.name: HandlerLoad(h.name, h.topic, capacity) for h, capacity, _ in consumer.load()}
        for load in self._loads.values():
            telemetry.CAPACITY.labels(load.handler).set(load.capacity)
        self._topics = sorted({load.topic for load in self._loads.values()})
        self._dead_read_at: float | None = None  # monotonic time of the last dead-letter reading

    async def refresh(self) -> None:
        """Read every handler's backlog once, concurrently; failures are recorded, never raised."""
        for handler, _, in_flight in self._worker.load():
            # A live gauge function is not shared across processes (``--processes N``): also store the value.
            telemetry.IN_FLIGHT.labels(handler.name).set(in_flight)
        for name, age in self._worker.oldest_in_hand().items():
            telemetry.OLDEST_IN_HAND.labels(name).set(age)
        await asyncio.gather(*(self._read(name) for name in self._loads), self._read_dead_letters())

    async def _read_dead_letters(self) -> None:
        now = time.monotonic()
        if self._dead_read_at is not None and now - self._dead_read_at < DEAD_LETTER_INTERVAL:
            return
        self._dead_read_at = now
        try:
            async with asyncio.timeout(self._timeout):
                counts = await dead_letters.waiting(self._transport, self._topics)
        except TimeoutError:
            log.debug("dead-letter counts: no answer within %gs", self._timeout)
            return
        except Exception:  # an adapter's bug must not stop the worker (a background crash does)
            log.exception("reading the dead-letter counts failed")
            return
        for topic, count in counts.items():
            if count is not None:
                telemetry.DEAD_LETTERS.labels(topic).set(count)

    async def _read(self, name: str) -> None:
        load = self._loads[name]
        try:
            async with asyncio.timeout(self._timeout):
                backlog = await ports.backlog_of(self._transport, self._subscriptions[name])
        except TimeoutError:
            self._failed(load, f"no answer within {self._timeout:g}s")
            return
        except errors.ConveyorError as exc:
            self._failed(load, str(exc))
            return
        except Exception as exc:  # an adapter's bug must not stop the worker (a background crash does)
            log.exception("reading the backlog of %s failed", name)
            self._failed(load, f"internal error: {type(exc).__name__}")
            return
        if backlog is None:
            load.error = "the broker reports no backlog"
            return
        load.backlog, load.read_at, load.error = backlog, datetime.now(UTC), None
        telemetry.BACKLOG.labels(name).set(backlog.pending)
        if backlog.oldest_age_s is not None:
            telemetry.OLDEST_AGE.labels(name).set(backlog.oldest_age_s)
        else:  # unknown to this broker: no sample rather than a made-up one
            with contextlib.suppress(KeyError):
                telemetry.OLDEST_AGE.remove(name)

    @staticmethod
    def _failed(load: HandlerLoad, reason: str) -> None:
        if load.error is None:  # log when reading starts failing, not every interval
            log.warning("cannot read the backlog of %s: %s", load.handler, reason)
        load.error = reason

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /scaling``: the last figures of every handler, in-flight as of now."""
        for handler, capacity, in_flight in self._worker.load():
            load = self._loads[handler.name]
            load.capacity, load.in_flight = capacity, in_flight
        return {"handlers": [load.as_json() for load in self._loads.values()]}

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            started = time.monotonic()
            await self.refresh()
            remaining = self._interval - (time.monotonic() - started)
            if remaining > 0:
                try:
                    async with asyncio.timeout(remaining):
                        await stop.wait()
                except TimeoutError:
                    pass
