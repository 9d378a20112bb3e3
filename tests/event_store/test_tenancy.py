"""Tenants at run time: equal ids of two tenants are two messages; what a handler publishes keeps its tenant."""

from __future__ import annotations

import prometheus_client
import sqlalchemy as sa
from conveyor import Context, envelope, on, registry
from conveyor.runtime import app
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.runtime.worker import Worker
from conveyor.testing import unique, wait_for
from conveyor.transports.memory import MemoryTransport
from relay_helpers import Relays

from event_store import Database


async def test_two_tenants_equal_ids_are_each_applied_once_and_children_keep_the_tenant(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE tenant_effects (tenant VARCHAR(64), message_id VARCHAR(64))"))
    topic, downstream, name = unique("tenant"), unique("tenant"), unique("tenant")
    seen: list[tuple[str | None, str | None]] = []

    @on(topic, name=name)
    async def apply(payload: dict, ctx: Context) -> None:
        async with ctx.transaction() as tx:
            await tx.session.execute(
                sa.text("INSERT INTO tenant_effects VALUES (:t, :m)"), {"t": ctx.message.tenant, "m": ctx.message.id}
            )
            tx.publish(downstream, {"from": ctx.message.id})

    @on(downstream, name=unique("tenant"))
    async def follow(payload: dict, ctx: Context) -> None:
        seen.append((ctx.message.tenant, payload["from"]))

    stores = app.stores_for(db, "t")
    transport = MemoryTransport(f"memory://{unique('tenant')}")
    await transport.connect()
    relays = Relays()
    worker = Worker(registry.Registry.of(apply, follow).handlers, transport, source="t", transactions=stores.units)
    await worker.start()
    relays.start(Relay(stores.relay_store(), transport, options=RelayOptions(poll_interval=0.05)))
    try:
        for tenant in ("acme", "globex", "acme"):  # the second acme copy is a duplicate
            event = envelope.create(topic, {}, source="shop", extensions={"tenant": tenant})
            event.id = "same-id"
            await transport.publish(topic, envelope.to_binary(event, transport.binary_prefix))
        await wait_for(lambda: len(seen) == 2, 10, "both tenants' follow-ups")
        labels = {"handler": name, "outcome": "duplicate"}
        await wait_for(
            lambda: prometheus_client.REGISTRY.get_sample_value("conveyor_messages_total", labels) == 1, 10, "the copy"
        )
    finally:
        await worker.stop(5)
        await relays.stop_all()
        await transport.close()
    async with db.transaction(readonly=True) as session:
        rows = sorted(tuple(r) for r in await session.execute(sa.text("SELECT tenant, message_id FROM tenant_effects")))
    assert rows == [("acme", "same-id"), ("globex", "same-id")]
    assert sorted(seen) == [("acme", "same-id"), ("globex", "same-id")]
