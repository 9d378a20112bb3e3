"""Metrics (Prometheus) for the runtime. Tracing is added by the transports' spans."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "conveyor_messages",
    "Messages handled, by handler and outcome (succeeded, retried, dead_lettered, duplicate).",
    ["handler", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "conveyor_handler_seconds",
    "Time spent in one handler attempt, in seconds.",
    ["handler"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge("conveyor_in_flight", "Messages accepted by a handler and not yet settled.", ["handler"])
PUBLISHED = Counter("conveyor_published", "Messages published, by topic.", ["topic"])
