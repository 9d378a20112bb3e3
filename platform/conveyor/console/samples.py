"""A short in-process history of each handler's figures, for the overview's rates and sparklines.

Every ``interval`` seconds a :class:`Sampler` reads this process's handler
metrics (``conveyor_messages`` by outcome, the ``conveyor_handler_seconds``
histogram) into a ring buffer of ``keep`` samples. Rates, error rates and
percentiles are differences between samples, so they describe the recent
window, not the process's lifetime; nothing is read from the broker here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Metric

from conveyor import telemetry

INTERVAL = 2.0
"""Seconds between two samples."""
KEEP = 60
"""Samples kept (two minutes at the default interval)."""
WINDOW = 30.0
"""Seconds the overview's rates and percentiles describe."""
_FAILED = ("retried", "dead_lettered")


@dataclass(slots=True)
class Counts:
    """One handler's cumulative figures at one instant.

    Attributes:
        outcomes: messages handled so far, by outcome.
        buckets: the duration histogram, ``(upper bound, cumulative count)`` in bound order.
    """

    outcomes: dict[str, float] = field(default_factory=dict)
    buckets: list[tuple[float, float]] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Messages handled, every outcome."""
        return sum(self.outcomes.values())

    @property
    def failed(self) -> float:
        """Attempts that failed (retried or dead-lettered)."""
        return sum(self.outcomes.get(name, 0.0) for name in _FAILED)


@dataclass(frozen=True, slots=True)
class Sample:
    """Every handler's figures at ``at`` (monotonic seconds)."""

    at: float
    handlers: Mapping[str, Counts]


@dataclass(frozen=True, slots=True)
class Figures:
    """What the overview shows for one handler over the recent window.

    Attributes:
        rate: messages handled per second.
        error_rate: share of them that failed (0 to 1), None when none was handled.
        p50: median attempt duration in seconds (a histogram bucket's bound), None when unknown.
        p95: 95th percentile, likewise.
        trend: messages per second between consecutive samples, oldest first.
        total: messages handled since the process started.
    """

    rate: float
    error_rate: float | None
    p50: float | None
    p95: float | None
    trend: list[float]
    total: float


def read(metrics: Iterable[Metric]) -> dict[str, Counts]:
    """Per handler, the counts in collected ``conveyor_messages`` and ``conveyor_handler_seconds`` metrics."""
    found: dict[str, Counts] = {}
    for metric in metrics:
        for sample in metric.samples:
            handler = sample.labels.get("handler")
            if handler is None:
                continue
            counts = found.setdefault(handler, Counts())
            if sample.name == "conveyor_messages_total":
                counts.outcomes[sample.labels["outcome"]] = sample.value
            elif sample.name == "conveyor_handler_seconds_bucket":
                counts.buckets.append((float(sample.labels["le"]), sample.value))
    for counts in found.values():
        counts.buckets.sort()
    return found


def _collect() -> dict[str, Counts]:
    return read([*telemetry.MESSAGES.collect(), *telemetry.HANDLER_SECONDS.collect()])


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of a cumulative histogram; None if empty.

    An observation above every finite bound reports the largest finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    finite = [bound for bound, _ in buckets if not math.isinf(bound)]
    for bound, count in buckets:
        if count >= rank:
            return bound if not math.isinf(bound) else (finite[-1] if finite else None)
    return None


class Sampler:
    """A ring buffer of handler samples, filled in the background.

    Args:
        interval: seconds between samples.
        keep: samples kept.
        collect: reads the current counts (this process's metrics by default).
    """

    def __init__(
        self, *, interval: float = INTERVAL, keep: int = KEEP, collect: Callable[[], dict[str, Counts]] | None = None
    ) -> None:
        self.interval = interval
        self._samples: deque[Sample] = deque(maxlen=keep)
        self._collect = collect or _collect

    def sample(self, at: float | None = None) -> None:
        """Take one sample now."""
        self._samples.append(Sample(time.monotonic() if at is None else at, self._collect()))

    def figures(self, handler: str, window: float = WINDOW) -> Figures:
        """The handler's rate, error rate, percentiles and trend over the last ``window`` seconds."""
        samples = list(self._samples)
        if not samples:
            return Figures(0.0, None, None, None, [], 0.0)
        last = samples[-1]
        first = next((s for s in samples if last.at - s.at <= window), last)
        now, then = last.handlers.get(handler, Counts()), first.handlers.get(handler, Counts())
        handled = now.total - then.total
        elapsed = last.at - first.at
        rate = handled / elapsed if elapsed > 0 else 0.0
        error_rate = (now.failed - then.failed) / handled if handled > 0 else None
        before = dict(then.buckets)
        recent = [(bound, count - before.get(bound, 0.0)) for bound, count in now.buckets]
        trend = []
        for older, newer in itertools.pairwise(samples):
            gap = newer.at - older.at
            delta = newer.handlers.get(handler, Counts()).total - older.handlers.get(handler, Counts()).total
            trend.append(delta / gap if gap > 0 else 0.0)
        return Figures(rate, error_rate, quantile(recent, 0.5), quantile(recent, 0.95), trend, now.total)

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await stop.wait()
