"""A broker restarted while a worker consumes and a relay publishes: nothing lost, nothing doubled.

The broker is a dedicated server of the test's own (never the machine's shared
RabbitMQ): NATS with JetStream file storage (:class:`NatsServer`), or a
RabbitMQ node (:class:`services.RabbitNode`), each restarted on the same port
and data directory. Messages go through the outbox and a ``conveyor relay``,
the production path: the first batch is committed before the restart (much of
it still queued in the broker when it stops), the second while the broker is
down, so the relay must retry it. NATS is killed (SIGKILL: a crash, acks it
had not persisted are lost), RabbitMQ stopped gracefully (SIGTERM, as in an
upgrade: it closes every connection, so the worker's acks in flight are lost);
each is then started again. Messages whose ack was lost come back as
duplicates for the inbox to absorb.
"""

from __future__ import annotations

import time
from pathlib import Path

import ledger
import pytest
import services
import workload
from conveyor.runtime.relay import RelayOptions
from conveyor.testing.servers import NatsServer

BEFORE = 1000
"""Messages committed to the outbox before the restart."""
DURING = 500
"""Messages committed while the broker is down."""
DOWN_S = 5.0
"""Seconds the broker stays down after it stopped."""
HANDLER_TIMEOUT = 2.0
"""The handler's timeout (short, in case the worker sizes NATS's ``ack_wait`` from it)."""
RECONNECT_CAP_S = 5.0
"""The worker's longest pause between reconnection attempts: RabbitTransport ``reconnect_max``, and the
NATS consumer's re-subscribe backoff cap (nats-py itself retries every 0.5 s)."""


def limit(outage_s: float, ack_wait: float | None) -> float:
    """The longest stall after the broker is back that the retry policy allows, for an outage this long.

    The relay backs off doubling from 0.1 s up to ``RelayOptions.max_backoff`` (30 s), so the pause
    it is in when the broker returns is at most about as long as the outage so far (and at most the
    cap); the worker reconnects within ``RECONNECT_CAP_S`` meanwhile. 3 s more to recover queues on
    start, publish the held batch and handle its first messages. On NATS a delivery whose ack died
    with the server is redelivered only after the consumer's ``ack_wait`` (read from the server), plus 5 s.
    """
    relay = min(outage_s, RelayOptions().max_backoff) + RECONNECT_CAP_S + 3.0
    return relay if ack_wait is None else max(relay, ack_wait + 5.0)


@pytest.mark.parametrize("broker", ["nats", "rabbit"])
def test_broker_restarted_mid_stream_loses_and_doubles_nothing(broker: str, tmp_path: Path) -> None:
    if broker == "rabbit":
        services.require_rabbitmq_server()
    server = NatsServer() if broker == "nats" else services.RabbitNode()
    count = BEFORE + DURING
    try:
        server.start()
        with workload.Scenario(tmp_path, server.url, FAULT_TIMEOUT=str(HANDLER_TIMEOUT)) as scenario:
            scenario.worker("worker")  # declares the queue first: RabbitMQ refuses unroutable publishes
            workload.seed_outbox(scenario.database_url, scenario.topic, range(BEFORE))
            scenario.relay()
            scenario.wait_handled(BEFORE // 3, timeout=60)
            ack_wait = scenario.nats_ack_wait() if broker == "nats" else None
            stopped_at = time.time()
            if isinstance(server, NatsServer):
                server.stop(kill=True)
            else:
                server.stop()
            at_stop = scenario.handled()
            workload.seed_outbox(scenario.database_url, scenario.topic, range(BEFORE, count))
            time.sleep(max(0.0, stopped_at + DOWN_S - time.time()))  # the outage itself: held on purpose
            server.start()
            restored_at = time.time()
            outage = restored_at - stopped_at
            allowed = limit(outage, ack_wait)
            gave_up = scenario.finish(count, timeout=allowed + 30)
            rows = scenario.effects()
            logs = scenario.logs()
    finally:
        server.close()
    counts = ledger.tally(rows, range(count))
    result = ledger.report(
        ledger.Result(
            scenario="broker restart mid-stream", broker=broker, load=count, faults=1, bad_inputs=0,
            lost=counts.lost, doubled=counts.doubled, stalled_s=workload.stall(rows, restored_at, gave_up),
            limit_s=allowed,
        )
    )  # fmt: skip
    print(f"{broker}: stopped at {at_stop}/{BEFORE} handled, down {outage:.1f}s; {result}")
    assert result.ok, f"{result}\n{logs}"
