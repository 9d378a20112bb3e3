"""``conveyor.testing.sagas.SagaTest``: a saga unit-tested without broker or database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pydantic
import pytest
from conveyor import Saga
from conveyor.testing.sagas import FakeTransaction, SagaTest


class Checkout(pydantic.BaseModel):
    order_id: str
    amount: int
    charge_id: str | None = None


class Charged(pydantic.BaseModel):
    charge_id: str


def checkout() -> Saga[Checkout]:
    saga = Saga("shop.kit-checkout", Checkout, id=lambda s: s.order_id)

    @saga.step(send="billing.charge", undo="billing.refund", timeout=timedelta(seconds=30))
    def charge(s: Checkout) -> dict[str, Any]:
        return {"order_id": s.order_id, "amount": s.amount}

    @charge.replied
    def charged(s: Checkout, reply: Charged) -> None:
        s.charge_id = reply.charge_id

    @charge.undo_payload
    def refund(s: Checkout) -> dict[str, Any]:
        return {"charge_id": s.charge_id}

    @saga.step(send="shipping.book", timeout=60)
    def book(s: Checkout) -> Checkout:
        return s

    @saga.step()
    async def confirm(s: Checkout, tx: Any) -> None:
        tx.publish("shop.confirmed", {"order_id": s.order_id})

    return saga


async def test_the_happy_path_sends_each_command_and_completes() -> None:
    test = SagaTest(checkout())
    assert await test.start(Checkout(order_id="o1", amount=10)) == "o1"
    assert test.sent() == [("billing.charge", {"order_id": "o1", "amount": 10})]
    await test.reply("billing.charge", {"charge_id": "c1"})
    assert test.state.charge_id == "c1"
    assert test.sent() == [("shipping.book", {"order_id": "o1", "amount": 10, "charge_id": "c1"})]
    await test.reply("shipping.book")
    assert test.status == "completed"
    assert isinstance(test.tx, FakeTransaction) and test.tx.published == [("shop.confirmed", {"order_id": "o1"})]


async def test_a_timeout_undoes_the_completed_steps_and_the_late_reply_is_ignored() -> None:
    test = SagaTest(checkout())
    await test.start(Checkout(order_id="o2", amount=10))
    await test.reply("billing.charge", {"charge_id": "c2"})
    test.sent()
    await test.advance(timedelta(seconds=59))
    assert test.status == "running"
    await test.advance(1)
    # the booking timed out: it is undone too (it has no undo), then the charge is refunded
    assert test.sent() == [("billing.refund", {"charge_id": "c2"})]
    await test.reply_to_token("2", True)  # the late reply to the booking
    assert test.status == "compensating" and test.log[-1].event == "ignored"
    await test.reply("billing.refund")
    assert test.status == "compensated"
    assert "no reply within 60s" in (test.error or "")


async def test_an_undo_failing_until_the_limit_parks_and_a_retry_finishes() -> None:
    saga = checkout()
    saga.max_undo_attempts = 2
    test = SagaTest(saga)
    await test.start(Checkout(order_id="o3", amount=10))
    await test.reply("billing.charge", {"charge_id": "c3"})
    await test.fail("shipping.book", reason="no courier")
    await test.fail("billing.refund", reason="bank down")
    await test.advance(1)  # the retry timer (undo_backoff 1 s) resends the refund
    await test.fail("billing.refund", reason="bank down")
    assert test.status == "failed" and "bank down" in (test.error or "")
    await test.retry()
    await test.reply("billing.refund")
    assert test.status == "compensated"


async def test_replying_to_a_command_that_is_not_awaited_is_a_test_error() -> None:
    test = SagaTest(checkout())
    await test.start(Checkout(order_id="o4", amount=10))
    with pytest.raises(AssertionError, match=r"does not wait for a reply from 'shipping\.book'"):
        await test.reply("shipping.book")


async def test_a_dead_lettered_command_and_an_unanswered_undo_play_out_as_in_production() -> None:
    test = SagaTest(checkout())
    await test.start(Checkout(order_id="o5", amount=10))
    await test.reply("billing.charge", {"charge_id": "c5"})
    test.sent()
    await test.dead_letter("shipping.book", "Rejected: no courier")
    assert test.status == "compensating" and "dead-lettered" in (test.error or "")
    assert test.sent() == [("billing.refund", {"charge_id": "c5"})]
    await test.advance(30)  # no reply to the refund: it is re-sent, the same message, after the backoff
    await test.advance(1)
    assert test.sent() == [("billing.refund", {"charge_id": "c5"})]
    await test.reply("billing.refund")
    assert test.status == "compensated"


def defaults_saga() -> Saga[Checkout]:
    saga = Saga("shop.kit-defaults", Checkout, id=lambda s: s.order_id)  # max_undo_attempts 10, undo_backoff 1 s

    @saga.step(send="billing.charge", undo="billing.refund")  # the default step timeout: 5 minutes
    def charge(s: Checkout) -> dict[str, Any]:
        return {"order_id": s.order_id}

    @saga.step(send="shipping.book")
    def book(s: Checkout) -> dict[str, Any]:
        return {"order_id": s.order_id}

    return saga


async def undoing(saga: Saga[Checkout]) -> SagaTest:
    test = SagaTest(saga)
    await test.start(Checkout(order_id="o1", amount=1))
    await test.reply("billing.charge")
    await test.fail("shipping.book", reason="no courier")
    return test


async def test_with_the_defaults_an_undo_that_keeps_failing_parks_after_511_seconds_of_backoff() -> None:
    test = await undoing(defaults_saga())
    test.sent()
    while test.status == "compensating":
        await test.fail("billing.refund", reason="bank down")  # each try fails at once
        while test.status == "compensating" and not test.sent():
            await test.advance(1)  # the retry timer fires once its backoff (1, 2, 4 ... 256 s) has passed
    assert (test.status, test.now) == ("failed", 1 + 2 + 4 + 8 + 16 + 32 + 64 + 128 + 256)


async def test_with_the_defaults_an_undo_that_gets_no_reply_parks_after_ten_timeouts_and_the_backoffs() -> None:
    test = await undoing(defaults_saga())
    while test.status == "compensating":
        await test.advance(1)  # nobody replies: 10 timeouts of 5 minutes, 9 re-sends after 1 ... 256 s
    assert test.status == "failed"
    assert 10 * 300 + 511 <= test.now <= 10 * 300 + 511 + 10  # about 58.5 minutes
