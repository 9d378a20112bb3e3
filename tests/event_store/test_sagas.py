"""Sagas through the real runtime: worker, unit of work, outbox relay, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import prometheus_client
import pydantic
import pytest
import sqlalchemy as sa
from conveyor import Context, Saga, envelope, on, registry, sagas_cli, settings
from conveyor.runtime import app
from conveyor.runtime.relay import Relay, RelayOptions
from conveyor.runtime.worker import Worker
from conveyor.sagas import runtime as saga_runtime
from conveyor.testing import unique
from conveyor.transports.memory import MemoryTransport
from opentelemetry import trace
from relay_helpers import Relays, wait_until

from event_store import Database, models


class Order(pydantic.BaseModel):
    order_id: str
    amount: int
    charge_id: str | None = None


class Charged(pydantic.BaseModel):
    charge_id: str


def checkout_saga(prefix: str, effects: list[str]) -> tuple[Saga[Order], list[Any]]:
    saga = Saga(f"{prefix}.checkout", Order, id=lambda s: s.order_id)

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund", timeout=30)
    def charge(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id, "amount": s.amount}

    @charge.replied
    def charged(s: Order, reply: Charged) -> None:
        s.charge_id = reply.charge_id

    @saga.step(send=f"{prefix}.reserve")
    def reserve(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id, "amount": s.amount}

    @on(f"{prefix}.charge", name=f"{prefix}.billing.charge")
    async def billing_charge(cmd: dict[str, Any], ctx: Context) -> None:
        effects.append(f"charge {cmd['order_id']}")
        ctx.reply({"charge_id": "ch-" + cmd["order_id"]})

    @on(f"{prefix}.refund", name=f"{prefix}.billing.refund")
    async def billing_refund(cmd: dict[str, Any], ctx: Context) -> None:
        effects.append(f"refund {cmd['order_id']}")
        ctx.reply()

    @on(f"{prefix}.reserve", name=f"{prefix}.inventory.reserve")
    async def reserve_stock(cmd: dict[str, Any], ctx: Context) -> None:
        if cmd["amount"] > 100:
            ctx.reply(failed=True, reason="out of stock")
        else:
            effects.append(f"reserve {cmd['order_id']}")
            ctx.reply()

    @on(f"{prefix}.placed", name=f"{prefix}.shop.place")
    async def place(order: Order, ctx: Context) -> None:
        async with ctx.transaction():
            effects.append(f"placed {order.order_id}")
        await saga.start(ctx, order)  # committed with the handler's transaction, or not at all

    return saga, [billing_charge, billing_refund, reserve_stock, place]


@pytest.fixture
async def running(db: Database, relays: Relays) -> AsyncIterator[tuple[Saga[Order], list[str], Any]]:
    effects: list[str] = []
    saga, participants = checkout_saga(unique("shop"), effects)
    stores = app.stores_for(db, "t")
    transport = MemoryTransport(f"memory://{unique('saga')}")
    await transport.connect()
    handlers = registry.Registry.of(saga, *participants).handlers
    worker = Worker(handlers, transport, source="t", transactions=stores.units)
    await worker.start()
    relays.start(Relay(stores.relay_store(), transport, options=RelayOptions(poll_interval=0.05)))

    async def status(instance: str) -> str | None:
        async with db.transaction(readonly=True) as session:
            record = await stores.sagas.load(session, saga.name, instance)
        return None if record is None else record.instance.status.value

    try:
        yield saga, effects, (stores, transport, status)
    finally:
        await worker.stop(5)
        await relays.stop_all()
        await transport.close()


async def start(db: Database, stores: Any, saga: Saga[Order], order: Order) -> None:
    async with db.transaction() as session:
        await stores.outbox.add(session, saga.topic, saga.start_event(order))


async def test_a_saga_completes_every_step(db: Database, running: Any) -> None:
    saga, effects, (stores, _, status) = running
    await start(db, stores, saga, Order(order_id="o1", amount=10))
    await wait_until_status(status, "o1", "completed")
    assert effects == ["charge o1", "reserve o1"]
    async with db.transaction(readonly=True) as session:
        record = await stores.sagas.load(session, saga.name, "o1")
        history = await stores.sagas.history(session, saga.name, "o1")
    assert record.instance.state["charge_id"] == "ch-o1"
    assert [h.entry.event for h in history] == ["started", "sent", "replied", "sent", "replied", "completed"]


async def test_a_failed_step_undoes_the_completed_ones(db: Database, running: Any) -> None:
    saga, effects, (stores, _, status) = running
    await start(db, stores, saga, Order(order_id="o2", amount=500))
    await wait_until_status(status, "o2", "compensated")
    assert effects == ["charge o2", "refund o2"]


async def test_a_second_start_with_the_same_id_changes_nothing(db: Database, running: Any) -> None:
    saga, effects, (stores, _, status) = running
    await start(db, stores, saga, Order(order_id="o3", amount=10))
    await start(db, stores, saga, Order(order_id="o3", amount=999))  # another start event, same instance id
    await wait_until_status(status, "o3", "completed")
    assert effects == ["charge o3", "reserve o3"]


async def unsent_on(db: Database, topic: str) -> list[str]:
    """The message ids of the unsent outbox rows to ``topic`` (a saga's pending timers, on its topic)."""
    table = models.outbox
    query = sa.select(table.c.message_id).where(table.c.topic == topic, table.c.sent_at.is_(None))
    async with db.transaction(readonly=True) as session:
        return list((await session.execute(query)).scalars())


@pytest.mark.parametrize(("amount", "end"), [(10, "completed"), (500, "compensated")])
async def test_a_finished_saga_leaves_no_timer_in_the_outbox_and_no_stale_timer_is_handled(
    db: Database, running: Any, amount: int, end: str
) -> None:
    saga, _, (stores, _, status) = running
    await start(db, stores, saga, Order(order_id="t1", amount=amount))
    await wait_until_status(status, "t1", end)
    # Every step (and undo) set a timeout timer (30 s, 5 min); each answered step deleted its
    # timer's row in the transaction that took the reply: the relay has nothing to publish.
    assert await unsent_on(db, saga.topic) == []
    async with db.transaction(readonly=True) as session:
        record = await stores.sagas.load(session, saga.name, "t1")
    assert record.instance.timer_id is None


async def wait_until_status(status: Any, instance: str, wanted: str) -> None:
    async def reached() -> bool:
        return bool(await status(instance) == wanted)

    await wait_until(reached, 15, f"saga {instance} {wanted}")


async def test_metrics_count_instances_by_status_and_time_each_step(db: Database, running: Any) -> None:
    saga, _, (stores, _, status) = running
    await start(db, stores, saga, Order(order_id="o4", amount=10))
    await start(db, stores, saga, Order(order_id="o5", amount=500))
    await wait_until_status(status, "o4", "completed")
    await wait_until_status(status, "o5", "compensated")
    stop = asyncio.Event()
    stop.set()  # one refresh, then return
    await saga_runtime.report(stores, [saga], stop)

    def sample(name: str, **labels: str) -> float | None:
        return prometheus_client.REGISTRY.get_sample_value(name, {"saga": saga.name, **labels})

    assert (sample("conveyor_sagas", status="completed"), sample("conveyor_sagas", status="compensated")) == (1, 1)
    assert sample("conveyor_sagas", status="failed") == 0
    assert sample("conveyor_saga_step_seconds_count", step="charge") == 2
    assert sample("conveyor_saga_transitions_total", status="compensated") == 1


@pytest.mark.parametrize(
    ("parts", "counts"), [(app.Parts(worker=True), False), (app.Parts(worker=False, relay=True), True)]
)
async def test_saga_instances_are_counted_by_the_relay_process_only_not_by_every_worker(
    db_url: str, parts: app.Parts, counts: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "conveyor")
    saga, participants = checkout_saga(unique("gauge"), [])
    config = settings.load(service="gauge", database_url=db_url, broker_url=f"memory://{unique('gauge')}",
                           http_port=0, console=False, drain_timeout=0.5)  # fmt: skip
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(config, registry.Registry.of(saga, *participants), parts, stop))

    def running() -> set[str]:
        return {task.get_name() for task in asyncio.all_tasks()}

    async def ready() -> bool:
        if serving.done():
            serving.result()
        return any(r.getMessage().startswith("service gauge ready") for r in caplog.records)

    try:
        await wait_until(ready, 30, "the process to be ready")  # every background task is started by then
        assert ("saga metrics" in running()) is counts
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(serving, return_exceptions=True), 30)


async def test_a_step_that_gets_no_reply_in_time_is_undone_and_its_late_reply_changes_nothing(
    db: Database, relays: Relays
) -> None:
    prefix = unique("late")
    saga = Saga(f"{prefix}.order", Order, id=lambda s: s.order_id)
    effects: list[str] = []

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund", timeout=0.3)
    def charge(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id}

    @on(f"{prefix}.charge", name=f"{prefix}.charge")
    async def slow_charge(cmd: dict[str, Any], ctx: Context) -> None:
        await asyncio.sleep(1.0)  # replies long after the saga's timeout
        effects.append("charge")
        ctx.reply()

    @on(f"{prefix}.refund", name=f"{prefix}.refund")
    async def refund(cmd: dict[str, Any], ctx: Context) -> None:
        effects.append("refund")
        ctx.reply()

    stores = app.stores_for(db, "t")
    transport = MemoryTransport(f"memory://{unique('late')}")
    await transport.connect()
    worker = Worker(registry.Registry.of(saga, slow_charge, refund).handlers, transport, source="t",
                    transactions=stores.units)  # fmt: skip
    await worker.start()
    relays.start(Relay(stores.relay_store(), transport, options=RelayOptions(poll_interval=0.05)))

    async def history() -> list[str]:
        async with db.transaction(readonly=True) as session:
            return [h.entry.event for h in await stores.sagas.history(session, saga.name, "o1")]

    async def late_reply_ignored() -> bool:
        return "ignored" in await history()

    try:
        await start(db, stores, saga, Order(order_id="o1", amount=1))
        await wait_until(late_reply_ignored, 15, "the late reply")
    finally:
        await worker.stop(5)
        await relays.stop_all()
        await transport.close()
    events = await history()
    assert events[: events.index("compensated") + 1] == [
        "started", "sent", "timed out", "compensating", "undo sent", "undone", "compensated",
    ]  # fmt: skip
    # The undo ran while the charge was still on its way; the saga ignores the late reply, so an undo
    # must make itself stick (the example's billing voids the payment so the late charge is refused).
    assert sorted(effects) == ["charge", "refund"]


async def test_one_trace_runs_from_the_start_through_every_command_and_reply(
    db: Database, running: Any, span_exporter: Any
) -> None:
    saga, _, (stores, _, status) = running
    span_exporter.clear()
    with trace.get_tracer("test").start_as_current_span("place order") as root:
        await start(db, stores, saga, Order(order_id="o6", amount=10))
    await wait_until_status(status, "o6", "completed")
    hops = [s for s in span_exporter.get_finished_spans() if s.name.startswith("process ")]
    names = {s.name for s in hops}
    prefix = saga.name.rsplit(".", 1)[0]
    assert {f"process {saga.topic}", f"process {prefix}.charge", f"process {prefix}.reserve"} <= names
    assert {s.context.trace_id for s in hops} == {root.get_span_context().trace_id}


async def test_a_handler_starts_a_saga_in_its_own_transaction(db: Database, running: Any) -> None:
    saga, effects, (_, transport, status) = running
    prefix = saga.name.rsplit(".", 1)[0]
    event = envelope.create(f"{prefix}.placed", {"order_id": "o7", "amount": 10}, source="shop")
    await transport.publish(f"{prefix}.placed", envelope.to_binary(event, transport.binary_prefix))
    await wait_until_status(status, "o7", "completed")
    assert effects == ["placed o7", "charge o7", "reserve o7"]


async def test_a_parked_saga_retried_by_an_operator_completes(db: Database, relays: Relays) -> None:
    prefix = unique("park")
    saga = Saga(f"{prefix}.order", Order, id=lambda s: s.order_id, max_undo_attempts=2,
                undo_backoff=timedelta(milliseconds=50))  # fmt: skip
    bank = {"up": False}

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund")
    def charge(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id}

    @saga.step(send=f"{prefix}.book")
    def book(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id}

    @on(f"{prefix}.charge", name=f"{prefix}.charge")
    async def charge_card(cmd: dict[str, Any], ctx: Context) -> None:
        ctx.reply()

    @on(f"{prefix}.book", name=f"{prefix}.book")
    async def no_courier(cmd: dict[str, Any], ctx: Context) -> None:
        ctx.reply(failed=True, reason="no courier")

    @on(f"{prefix}.refund", name=f"{prefix}.refund")
    async def refund(cmd: dict[str, Any], ctx: Context) -> None:
        if bank["up"]:
            ctx.reply()
        else:
            ctx.reply(failed=True, reason="bank down")

    stores = app.stores_for(db, "t")
    transport = MemoryTransport(f"memory://{unique('park')}")
    await transport.connect()
    worker = Worker(registry.Registry.of(saga, charge_card, no_courier, refund).handlers, transport, source="t",
                    transactions=stores.units)  # fmt: skip
    await worker.start()
    relays.start(Relay(stores.relay_store(), transport, options=RelayOptions(poll_interval=0.05)))

    async def status() -> str | None:
        async with db.transaction(readonly=True) as session:
            record = await stores.sagas.load(session, saga.name, "o1")
        return None if record is None else record.instance.status.value

    try:
        await start(db, stores, saga, Order(order_id="o1", amount=1))
        await wait_until(lambda: _is(status, "failed"), 15, "the saga to park")
        bank["up"] = True
        await sagas_cli.request(stores, "o1", None, "retry", "operator")
        await wait_until(lambda: _is(status, "compensated"), 15, "the retried saga to finish")
    finally:
        await worker.stop(5)
        await relays.stop_all()
        await transport.close()


async def _is(status: Any, wanted: str) -> bool:
    return bool(await status() == wanted)
