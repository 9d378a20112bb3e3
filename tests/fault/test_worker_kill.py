"""kill -9 of a ``conveyor worker`` mid-stream, on each broker: nothing lost, nothing doubled, a bounded stall.

Two workers share the handler; once about a third of the messages have their
effect, one of them is SIGKILLed (no drain, no goodbye to the broker) and a
replacement is started. Its unsettled deliveries come back through the broker
(RabbitMQ requeues them when the connection drops, NATS after ``ack_wait``,
Kafka to the partitions' next owner after the session timeout and a
rebalance); whatever had already committed is absorbed by the inbox.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import ledger
import pytest
import workload

COUNT = 2000
HANDLER_TIMEOUT = 2.0
"""The handler's timeout (short, in case the worker sizes NATS's ``ack_wait`` from it)."""


def limit(broker: str, scenario: workload.Scenario) -> float:
    """The longest stall after the kill the broker's redelivery policy allows, in seconds."""
    if broker == "rabbit":
        # The kernel resets the dead worker's AMQP connection, so the quorum queue requeues its unacked
        # deliveries at once and the surviving worker never stops; 5 s covers a loaded 2-core machine.
        return 5.0
    if broker == "nats":
        # The server redelivers the dead worker's deliveries once the consumer's ``ack_wait`` (read from
        # the server: what the worker declared) expires; the survivor's in-progress acks keep its own
        # alive. Plus 5 s for them to be handled.
        return scenario.nats_ack_wait() + 5.0
    # The dead member is dropped after session_timeout_ms (2 s); Tansu holds the JoinGroup about half
    # of it (1 s); the survivor's revoke grace is a quarter of the rebalance timeout (0.5 s); the
    # replacement joining costs one more such rebalance (3.5 s). Plus 3 s to fetch and handle.
    return 2.0 + 1.0 + 0.5 + 3.5 + 3.0


@pytest.mark.parametrize("broker", ["rabbit", "nats", "kafka"])
def test_worker_killed_mid_stream_loses_and_doubles_nothing(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    url = workload.kafka(url) if broker == "kafka" else url
    started = time.monotonic()
    with workload.Scenario(tmp_path, url, FAULT_TIMEOUT=str(HANDLER_TIMEOUT)) as scenario:
        victim, _ = scenario.worker("worker-a")
        scenario.worker("worker-b")
        publisher = threading.Thread(target=workload.publish, args=(url, scenario.topic, range(COUNT)), daemon=True)
        publisher.start()
        scenario.wait_handled(COUNT // 3, timeout=60)
        killed_at = time.time()
        victim.popen.kill()
        victim.popen.wait()
        at_kill = scenario.handled()
        scenario.worker("worker-c")
        publisher.join(60)
        assert not publisher.is_alive(), "publishing took over a minute"
        allowed = limit(broker, scenario)
        gave_up = scenario.finish(COUNT, timeout=allowed + 30)
        rows = scenario.effects()
        logs = scenario.logs()
    counts = ledger.tally(rows, range(COUNT))
    result = ledger.report(
        ledger.Result(
            scenario="worker kill -9 mid-stream", broker=broker, load=COUNT, faults=1, bad_inputs=0,
            lost=counts.lost, doubled=counts.doubled, stalled_s=workload.stall(rows, killed_at, gave_up),
            limit_s=allowed,
        )
    )  # fmt: skip
    print(f"{broker}: killed at {at_kill}/{COUNT} handled; {time.monotonic() - started:.1f}s in all; {result}")
    assert result.ok, f"{result}\n{logs}"
