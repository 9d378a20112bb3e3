"""How a saga learns a step's fate through the real runtime, on SQLite and PostgreSQL.

A local step whose own write breaks a constraint fails the step (the saga
compensates in the same transaction, after the savepoint rolled the write back).
An undo that gets no reply in time is re-sent as the same message, which the
participant's inbox absorbs. A command the participant's worker dead-letters
fails its step at once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from conveyor import Context, Reject, Saga, on
from conveyor.testing import unique
from saga_pool import Harness

from event_store import Database


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


class Booking(pydantic.BaseModel):
    order_id: str
    amount: int


@pytest.fixture
async def ledger(db: Database) -> Database:
    """``saga_ledger``: one row per order (a unique key), a positive amount (a CHECK used as a business rule)."""
    async with db.transaction() as session:
        await session.execute(
            sa.text(
                "CREATE TABLE saga_ledger (order_id VARCHAR(64) PRIMARY KEY, amount INTEGER NOT NULL "
                "CONSTRAINT positive_amount CHECK (amount > 0))"
            )
        )
        await session.execute(sa.text("CREATE TABLE saga_notes (order_id VARCHAR(64), note VARCHAR(64))"))
    return db


def booking_saga(prefix: str, effects: list[str]) -> tuple[Saga[Order], list[Any]]:
    """charge (undo: refund), then a local step writing the order to the ledger."""
    saga = Saga(f"{prefix}.book", Order, id=lambda s: s.order_id)

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund", timeout=30)
    def charge(s: Order) -> dict[str, Any]:
        return s.model_dump()

    @saga.step()
    async def enter(s: Order, tx: Any) -> None:
        await tx.session.execute(
            sa.text("INSERT INTO saga_notes (order_id, note) VALUES (:o, 'entering')"), {"o": s.order_id}
        )
        await tx.session.execute(
            sa.text("INSERT INTO saga_ledger (order_id, amount) VALUES (:o, :a)"), {"o": s.order_id, "a": s.amount}
        )

    @on(f"{prefix}.charge", name=f"{prefix}.charge")
    async def charge_card(cmd: dict[str, Any], ctx: Context) -> None:
        effects.append(f"charge {cmd['order_id']}")
        ctx.reply()

    @on(f"{prefix}.refund", name=f"{prefix}.refund")
    async def refund(cmd: dict[str, Any], ctx: Context) -> None:
        effects.append(f"refund {cmd['order_id']}")
        ctx.reply()

    return saga, [charge_card, refund]


async def rows(db: Database, table: str, order: str) -> int:
    async with db.transaction(readonly=True) as session:
        query = sa.text(f"SELECT count(*) FROM {table} WHERE order_id = :o")
        return int((await session.execute(query, {"o": order})).scalar_one())


@pytest.mark.parametrize("rule", ["check", "unique"])
async def test_a_local_step_whose_write_breaks_a_constraint_compensates_the_saga(ledger: Database, rule: str) -> None:
    prefix = unique("fate")
    effects: list[str] = []
    saga, participants = booking_saga(prefix, effects)
    order = Order(order_id=f"{prefix}-1", amount=-5 if rule == "check" else 7)
    if rule == "unique":  # the order is in the ledger already
        async with ledger.transaction() as session:
            await session.execute(sa.text("INSERT INTO saga_ledger VALUES (:o, 1)"), {"o": order.order_id})
    harness = Harness(ledger, saga, *participants)
    async with ledger.transaction() as session:
        await harness.stores.outbox.add(session, saga.topic, saga.start_event(order))

    async def finished() -> bool:
        return await harness.status(saga.name, order.order_id) in ("compensated", "completed", "failed")

    try:
        await harness.run_until(finished, "the saga to finish")
    finally:
        await harness.close()
    assert await harness.status(saga.name, order.order_id) == "compensated"
    assert effects == [f"charge {order.order_id}", f"refund {order.order_id}"]
    assert harness.nacks() == 0  # the step's own failure, decided at once: the reply was not retried
    history = await harness.history(saga.name, order.order_id)
    assert history[history.index("replied") :] == ["replied", "failed", "compensating", "undo sent", "undone",
                                                   "compensated"]  # fmt: skip
    # the step's writes were rolled back to its savepoint; the compensation committed after it
    assert await rows(ledger, "saga_notes", order.order_id) == 0
    assert await rows(ledger, "saga_ledger", order.order_id) == (0 if rule == "check" else 1)


@pytest.fixture
async def effects_table(db: Database) -> Database:
    """``saga_effects``: what transactional participants did, one row per effect."""
    async with db.transaction() as session:
        await session.execute(sa.text("CREATE TABLE saga_effects (effect VARCHAR(16), order_id VARCHAR(64))"))
    return db


def participant(topic: str, effect: str, *, fail: str | None = None) -> Any:
    """A transactional participant recording ``effect`` and replying; ``fail``: it replies a failure instead."""

    async def act(cmd: dict[str, Any], ctx: Context) -> None:
        async with ctx.transaction() as tx:
            if fail is not None:
                ctx.reply(failed=True, reason=fail)
                return
            await tx.session.execute(
                sa.text("INSERT INTO saga_effects (effect, order_id) VALUES (:e, :o)"),
                {"e": effect, "o": cmd["order_id"]},
            )
            ctx.reply()

    act.__name__ = act.__qualname__ = f"act_{effect}"
    return on(topic, name=topic)(act)


async def effects_of(db: Database, order: str) -> list[str]:
    async with db.transaction(readonly=True) as session:
        query = sa.text("SELECT effect FROM saga_effects WHERE order_id = :o ORDER BY effect")
        return [row[0] for row in await session.execute(query, {"o": order})]


async def test_an_undo_re_sent_after_its_timeout_is_absorbed_by_the_participants_inbox(
    effects_table: Database,
) -> None:
    db = effects_table
    prefix = unique("resend")
    saga = Saga(f"{prefix}.order", Order, id=lambda s: s.order_id, undo_backoff=timedelta(milliseconds=50))

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund", timeout=0.3)
    def charge(s: Order) -> dict[str, Any]:
        return s.model_dump()

    @saga.step(send=f"{prefix}.book")
    def book(s: Order) -> dict[str, Any]:
        return s.model_dump()

    participants = [participant(f"{prefix}.charge", "charge"), participant(f"{prefix}.refund", "refund"),
                    participant(f"{prefix}.book", "book", fail="no courier")]  # fmt: skip
    harness = Harness(db, saga, *participants)
    order = Order(order_id=f"{prefix}-1", amount=3)
    async with db.transaction() as session:
        await harness.stores.outbox.add(session, saga.topic, saga.start_event(order))
    harness.held.add(f"{prefix}.refund")  # the refund is slow: its reply misses the step's timeout

    async def resent() -> bool:
        return len(harness.pending(f"{prefix}.refund")) >= 2

    async def finished() -> bool:
        return await harness.status(saga.name, order.order_id) == "compensated"

    try:
        await harness.run_until(resent, "the unanswered refund to be re-sent")
        first, again = harness.pending(f"{prefix}.refund")[:2]
        assert again.message_id == first.message_id  # the same message: the participant's inbox absorbs it
        harness.held.clear()
        await harness.run_until(finished, "the saga to take the first refund's late reply")
    finally:
        await harness.close()
    assert await effects_of(db, order.order_id) == ["charge", "refund"]  # refunded once
    history = await harness.history(saga.name, order.order_id)
    assert history.count("undone") == 1 and "undo re-sent" in history


@pytest.mark.parametrize("failure", ["rejected", "poison"])
async def test_a_command_the_participants_worker_dead_letters_fails_its_step_at_once(
    effects_table: Database, failure: str
) -> None:
    db = effects_table
    prefix = unique("dead")
    saga = Saga(f"{prefix}.order", Order, id=lambda s: s.order_id)  # steps wait 5 minutes for a reply

    @saga.step(send=f"{prefix}.charge", undo=f"{prefix}.refund")
    def charge(s: Order) -> dict[str, Any]:
        return s.model_dump()

    @saga.step(send=f"{prefix}.book", undo=f"{prefix}.unbook")
    def book(s: Order) -> dict[str, Any]:
        return s.model_dump() if failure == "rejected" else {"order_id": s.order_id}  # poison: no amount

    @on(f"{prefix}.book", name=f"{prefix}.book")
    async def no_courier_service(cmd: Booking, ctx: Context) -> None:
        raise Reject("the courier service refuses this address")  # never replies: the worker dead-letters

    participants = [participant(f"{prefix}.charge", "charge"), participant(f"{prefix}.refund", "refund"),
                    participant(f"{prefix}.unbook", "unbook"), no_courier_service]  # fmt: skip
    harness = Harness(db, saga, *participants)
    order = Order(order_id=f"{prefix}-1", amount=3)
    async with db.transaction() as session:
        await harness.stores.outbox.add(session, saga.topic, saga.start_event(order))

    async def finished() -> bool:
        return await harness.status(saga.name, order.order_id) == "compensated"

    try:
        await harness.run_until(finished, "the saga to learn its command was dead-lettered")
    finally:
        await harness.close()
    assert [topic for topic, _ in harness.dead] == [f"{prefix}.book.dlq"]  # the dead letter is kept as well
    # the booking may still happen if the dead letter is replayed: it is undone too, as on a timeout
    assert await effects_of(db, order.order_id) == ["charge", "refund", "unbook"]
    history = await harness.history(saga.name, order.order_id)
    assert history[: history.index("compensating")] == ["started", "sent", "replied", "sent", "dead-lettered"]
