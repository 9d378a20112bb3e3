"""The relay's readiness: parked rows and a stalled backlog make ``/readyz`` degraded, not green."""

from __future__ import annotations

import httpx
from conveyor.runtime import http
from conveyor.runtime.relay import Relay, RelayOptions
from relay_helpers import Broker, Refusing, add, connected

from event_store import Database, SqlOutboxStore


async def readiness(relay: Relay) -> tuple[int, str]:
    app = http.create_app([http.Check("relay", relay.health, critical=False)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/readyz")
    return response.status_code, response.json()["status"]


async def test_relay_with_a_parked_row_is_degraded(db: Database, broker: Broker) -> None:
    await add(db, 1, key="k")
    transport = await connected(Refusing(broker.url, {"k"}))
    relay = Relay(SqlOutboxStore(db, listen=False), transport, options=RelayOptions(max_attempts=1))
    await relay.run_once()
    await relay.refresh_metrics()
    assert await readiness(relay) == (200, "degraded")


async def test_relay_whose_oldest_due_row_waits_too_long_is_degraded(db: Database, broker: Broker) -> None:
    await add(db, 1)
    relay = Relay(SqlOutboxStore(db, listen=False), broker.transport, options=RelayOptions(stall_after=0.0))
    await relay.refresh_metrics()  # nothing published yet: the row is waiting
    assert await readiness(relay) == (200, "degraded")


async def test_relay_that_keeps_up_is_healthy(db: Database, broker: Broker) -> None:
    await add(db, 1)
    relay = Relay(SqlOutboxStore(db, listen=False), broker.transport)
    await relay.run_once()
    await relay.refresh_metrics()
    assert await readiness(relay) == (200, "healthy")
