"""Sagas under any delivery order: duplicates, reordering and crashes before commit never change the outcome.

The production path runs unchanged — :class:`HandlerRunner` for the saga's
handler and its (transactional) participants, the SQL unit of work, the outbox
and the relay — but the broker is a pool the test draws from: hypothesis picks
which pending message is delivered next, delivers copies of messages already
handled, and makes attempts crash before their commit. Whatever it picks, each
instance ends as the clean run ends, with every participant's effect applied
exactly once.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pydantic
import sqlalchemy as sa
from conveyor import Context, Saga, envelope, on, persistence, registry
from conveyor.runtime import app
from conveyor.runtime.handling import HandlerRunner
from conveyor.runtime.relay import Relay
from conveyor.testing import unique
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saga_pool import Delivery, Pool

from event_store import Database

FAILING = 500  # an order of this amount cannot be booked: the saga compensates


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


class Crashing:
    """Units of work whose commit fails when told to: a crash before the commit."""

    def __init__(self, units: persistence.UnitOfWorkFactory) -> None:
        self.units = units
        self.crash_next = False

    async def begin(self, handler: str, message_id: str) -> Any:
        unit = await self.units.begin(handler, message_id)
        if unit is None or not self.crash_next:
            return unit
        self.crash_next = False
        real_commit = unit.commit

        async def crash(outgoing: Any) -> None:
            await unit.rollback(None)
            raise ConnectionResetError("the process died before the commit")

        unit.commit = crash  # type: ignore[method-assign]
        del real_commit
        return unit


def build(prefix: str) -> tuple[Saga[Order], list[Any]]:
    saga = Saga(f"{prefix}.order", Order, id=lambda s: s.order_id)

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund")
    def charge(s: Order) -> dict[str, Any]:
        return s.model_dump()

    @saga.step(send=f"{prefix}.reserve", undo=f"{prefix}.release")
    def reserve(s: Order) -> dict[str, Any]:
        return s.model_dump()

    @saga.step(send=f"{prefix}.book")
    def book(s: Order) -> dict[str, Any]:
        return s.model_dump()

    def participant(command: str) -> Any:
        async def act(cmd: dict[str, Any], ctx: Context) -> None:
            async with ctx.transaction() as tx:
                if command == "book" and cmd["amount"] == FAILING:
                    ctx.reply(failed=True, reason="no courier")
                    return
                await tx.session.execute(
                    sa.text("INSERT INTO saga_effects (effect, order_id) VALUES (:e, :o)"),
                    {"e": command, "o": cmd["order_id"]},
                )
                ctx.reply()

        act.__name__ = act.__qualname__ = f"act_{command}"
        return on(f"{prefix}.{command}", name=f"{prefix}.{command}")(act)

    return saga, [participant(c) for c in ("charge", "refund", "reserve", "release", "book")]


async def effects(db: Database, orders: list[str]) -> list[tuple[str, str]]:
    async with db.transaction(readonly=True) as session:
        rows = await session.execute(
            sa.text("SELECT effect, order_id FROM saga_effects WHERE order_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": orders},
        )
        return sorted((row[0], row[1]) for row in rows)


async def statuses(db: Database, stores: persistence.Persistence, saga: str, orders: list[str]) -> dict[str, str]:
    found = {}
    async with db.transaction(readonly=True) as session:
        for order in orders:
            record = await stores.sagas.load(session, saga, order)
            found[order] = record.instance.status.value if record else "missing"
    return found


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    amounts=st.lists(st.sampled_from([10, FAILING]), min_size=1, max_size=3),
)
async def test_duplicates_reordering_and_crashes_never_change_the_outcome(
    db: Database, seed: int, amounts: list[int]
) -> None:
    async with db.transaction() as session:
        await session.execute(
            sa.text("CREATE TABLE IF NOT EXISTS saga_effects (effect VARCHAR(16), order_id VARCHAR(64))")
        )
    chance = random.Random(seed)
    prefix = unique("prop")
    saga, participants = build(prefix)
    stores = app.stores_for(db, "t")
    pool = Pool()
    units = Crashing(stores.units)
    runners = {
        h.topic: HandlerRunner(h, pool, source="t", max_message_bytes=1 << 20, transactions=units)
        for h in registry.Registry.of(saga, *participants).handlers
    }
    relay = Relay(stores.relay_store(), pool)
    orders = [f"{prefix}-{n}" for n in range(len(amounts))]
    async with db.transaction() as session:
        for order, amount in zip(orders, amounts, strict=True):
            await stores.outbox.add(session, saga.topic, saga.start_event(Order(order_id=order, amount=amount)))
    handled: list[tuple[str, envelope.WireMessage]] = []
    try:
        for _ in range(400):
            await relay.run_once()
            if not pool.pending:
                break
            topic, message = pool.pending.pop(chance.randrange(len(pool.pending)))  # any order
            units.crash_next = chance.random() < 0.2
            delivery = Delivery(topic, message, 1)
            await runners[topic].process(delivery)
            if delivery.settled != "ack":  # crashed: the broker delivers it again later
                pool.pending.append((topic, message))
                continue
            handled.append((topic, message))
            if chance.random() < 0.3:  # a redelivery of something already handled
                pool.pending.append(handled[chance.randrange(len(handled))])
            signals = [m for t, m in handled if t == saga.topic]
            if signals and chance.random() < 0.2:  # a signal copied under a new id: a reply sent twice, a late one
                again = signals[chance.randrange(len(signals))]
                headers = {**again.headers, pool.binary_prefix + "id": envelope.new_id()}
                pool.pending.append((saga.topic, envelope.WireMessage(again.body, headers, again.key)))
        else:
            raise AssertionError("the saga did not settle in 400 deliveries")
    finally:
        await relay.store.close()
    expected_status = {o: "compensated" if a == FAILING else "completed" for o, a in zip(orders, amounts, strict=True)}
    assert await statuses(db, stores, saga.name, orders) == expected_status
    expected_effects = sorted(
        (effect, order)
        for order, amount in zip(orders, amounts, strict=True)
        for effect in (
            ("charge", "reserve", "release", "refund") if amount == FAILING else ("charge", "reserve", "book")
        )
    )
    assert await effects(db, orders) == expected_effects


async def test_two_copies_of_a_reply_at_the_same_moment_are_serialised_by_the_version(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(
            sa.text("CREATE TABLE IF NOT EXISTS saga_effects (effect VARCHAR(16), order_id VARCHAR(64))")
        )
    prefix = unique("race")
    saga = Saga(f"{prefix}.order", Order, id=lambda s: s.order_id)

    @saga.step(send=f"{prefix}.charge")
    def charge(s: Order) -> dict[str, Any]:
        return s.model_dump()

    @saga.step()
    async def record(s: Order, tx: Any) -> None:
        await tx.session.execute(
            sa.text("INSERT INTO saga_effects (effect, order_id) VALUES ('recorded', :o)"), {"o": s.order_id}
        )
        await asyncio.sleep(0.3)  # both transitions hold their transaction open here at once

    stores = app.stores_for(db, "t")
    pool = Pool()
    [handler] = registry.Registry.of(saga).handlers
    runners = [HandlerRunner(handler, pool, source="t", max_message_bytes=1 << 20, transactions=stores.units)
               for _ in range(2)]  # fmt: skip
    relay = Relay(stores.relay_store(), pool)
    async with db.transaction() as session:
        await stores.outbox.add(session, saga.topic, saga.start_event(Order(order_id=prefix, amount=1)))
    try:
        await relay.run_once()
        [(topic, start)] = pool.pending
        pool.pending.clear()
        await runners[0].process(Delivery(topic, start, 1))
        await relay.run_once()
        [(_, command)] = pool.pending
        assert command.key == prefix  # the charge command, keyed by the instance
        pool.pending.clear()
        reply = envelope.to_binary(
            envelope.create("conveyor.saga.reply", None, source="billing", key=prefix,
                            extensions={"sagaid": prefix, "sagatoken": "1", "sagaresult": "ok"}),
            pool.binary_prefix,
        )  # fmt: skip
        twin = envelope.WireMessage(reply.body, {**reply.headers, pool.binary_prefix + "id": envelope.new_id()})
        first, second = Delivery(saga.topic, reply, 1), Delivery(saga.topic, twin, 1)
        await asyncio.gather(runners[0].process(first), runners[1].process(second))
        if "nack" in (first.settled, second.settled):  # the loser's retry finds the token answered
            await runners[0].process(Delivery(saga.topic, twin if second.settled == "nack" else reply, 2))
    finally:
        await relay.store.close()
    assert await statuses(db, stores, saga.name, [prefix]) == {prefix: "completed"}
    assert await effects(db, [prefix]) == [("recorded", prefix)]
    async with db.transaction(readonly=True) as session:
        history = await stores.sagas.history(session, saga.name, prefix)
    assert [h.entry.event for h in history].count("replied") == 1
