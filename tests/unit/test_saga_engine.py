"""Saga transitions: steps in order, undo in reverse, stale signals ignored, undo retries bounded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pydantic
import pytest
from conveyor import errors
from conveyor.sagas import definition, engine
from conveyor.sagas.engine import Status


class Order(pydantic.BaseModel):
    order_id: str
    charge_id: str | None = None
    noted: list[str] = []


def make(max_undo_attempts: int = 3, local_fails: bool = False) -> definition.Saga[Order]:
    saga = definition.Saga("shop.checkout", Order, id=lambda s: s.order_id, max_undo_attempts=max_undo_attempts)

    @saga.step(send="billing.charge", undo="billing.refund", timeout=30)
    def charge(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id}

    @charge.replied
    def charged(s: Order, reply: dict[str, Any]) -> None:
        s.charge_id = reply["charge_id"]

    @saga.step(send="inventory.reserve", undo="inventory.release")
    def reserve(s: Order) -> dict[str, Any]:
        return {"order_id": s.order_id}

    async def unnote(s: Order, tx: object) -> None:
        s.noted.remove("confirmed")

    @saga.step(undo=unnote)
    async def confirm(s: Order, tx: object) -> None:
        s.noted.append("confirmed")

    @saga.step()
    async def finish(s: Order, tx: object) -> None:
        if local_fails:
            raise RuntimeError("no")

    return saga


async def run_local(func: definition.Local, state: pydantic.BaseModel) -> None:
    await func(state, None)


async def started(saga: definition.Saga[Order]) -> engine.Instance:
    transition = await engine.start(saga, "o1", Order(order_id="o1"), run_local)
    assert transition.instance is not None
    return transition.instance


async def test_steps_run_in_order_and_the_saga_completes() -> None:
    saga = make()
    first = await started(saga)
    assert (first.status, first.waiting, first.version) == (Status.RUNNING, "1", 1)
    second = await engine.reply(saga, first, "1", True, {"charge_id": "c1"}, run_local)
    assert [s.topic for s in second.sends] == ["inventory.reserve"]
    assert second.instance is not None and second.instance.state["charge_id"] == "c1"
    third = await engine.reply(saga, second.instance, "2", True, {}, run_local)
    assert third.instance is not None
    assert (third.instance.status, third.instance.state["noted"], third.instance.version) == (
        Status.COMPLETED, ["confirmed"], 3,
    )  # fmt: skip


async def test_a_failure_at_step_k_undoes_the_steps_before_it_in_reverse_order() -> None:
    saga = make(local_fails=True)
    instance = await started(saga)
    instance = (await engine.reply(saga, instance, "1", True, {"charge_id": "c1"}, run_local)).instance
    assert instance is not None
    after = await engine.reply(saga, instance, "2", True, {}, run_local)
    assert after.instance is not None
    # finish failed: confirm is undone locally, then reserve's undo is sent
    assert after.instance.state["noted"] == []
    assert [(s.topic, s.kind) for s in after.sends] == [("inventory.release", "undo")]
    released = await engine.reply(saga, after.instance, after.instance.waiting or "", True, {}, run_local)
    assert [s.topic for s in released.sends] == ["billing.refund"]
    assert released.instance is not None
    refunded = await engine.reply(saga, released.instance, released.instance.waiting or "", True, {}, run_local)
    assert refunded.instance is not None and refunded.instance.status is Status.COMPENSATED


async def test_a_failure_reply_does_not_undo_the_failed_step_itself() -> None:
    saga = make()
    instance = await started(saga)
    after = await engine.reply(saga, instance, "1", False, {"reason": "card declined"}, run_local)
    assert after.instance is not None
    assert (after.instance.status, after.sends) == (Status.COMPENSATED, [])
    assert "card declined" in (after.instance.error or "")


async def test_a_timeout_undoes_the_step_that_timed_out_and_a_late_reply_changes_nothing() -> None:
    saga = make()
    instance = await started(saga)
    timed_out = await engine.timer(saga, instance, "1", "timeout", run_local)
    assert timed_out.instance is not None
    assert [s.topic for s in timed_out.sends] == ["billing.refund"]
    late = await engine.reply(saga, timed_out.instance, "1", True, {"charge_id": "late"}, run_local)
    assert not late.changed and late.log[0].event == "ignored"


async def test_duplicate_and_stale_replies_change_nothing() -> None:
    saga = make()
    instance = await started(saga)
    moved = await engine.reply(saga, instance, "1", True, {"charge_id": "c1"}, run_local)
    assert moved.instance is not None
    again = await engine.reply(saga, moved.instance, "1", True, {"charge_id": "c2"}, run_local)
    unknown = await engine.reply(saga, moved.instance, "99", False, {}, run_local)
    assert (again.changed, unknown.changed) == (False, False)


async def test_an_undo_that_keeps_failing_parks_the_saga_and_an_operator_retry_resumes_it() -> None:
    saga = make(max_undo_attempts=2)
    instance = await started(saga)
    failing = await engine.reply(saga, instance, "1", True, {"charge_id": "c1"}, run_local)
    assert failing.instance is not None
    undoing = (await engine.reply(saga, failing.instance, "2", False, {"reason": "no stock"}, run_local)).instance
    assert undoing is not None and undoing.status is Status.COMPENSATING
    first = await engine.reply(saga, undoing, undoing.waiting or "", False, {"reason": "bank down"}, run_local)
    assert first.instance is not None and [t.kind for t in first.timers] == ["retry"]
    resent = await engine.timer(saga, first.instance, first.instance.waiting or "", "retry", run_local)
    assert resent.instance is not None and [s.topic for s in resent.sends] == ["billing.refund"]
    parked = await engine.reply(saga, resent.instance, resent.instance.waiting or "", False, {}, run_local)
    assert parked.instance is not None and parked.instance.status is Status.FAILED
    assert parked.timers == [] and parked.sends == []
    resumed = await engine.resume(saga, parked.instance, run_local)
    assert resumed.instance is not None and [s.topic for s in resumed.sends] == ["billing.refund"]
    done = await engine.reply(saga, resumed.instance, resumed.instance.waiting or "", True, {}, run_local)
    assert done.instance is not None and done.instance.status is Status.COMPENSATED


async def test_a_store_error_in_a_local_step_is_not_the_steps_fault() -> None:
    saga = definition.Saga("shop.store-error", Order)

    @saga.step()
    async def write(s: Order, tx: object) -> None:
        raise errors.StoreUnavailable("database down")

    with pytest.raises(errors.StoreUnavailable):
        await engine.start(saga, "o1", Order(order_id="o1"), run_local)


@pytest.mark.parametrize("error", [errors.StoreUnavailable("down"), errors.ConcurrencyConflict("raced"),
                                   errors.StoreError("odd")])  # fmt: skip
async def test_an_outage_or_conflict_in_a_local_step_or_undo_propagates_for_a_retry(error: Exception) -> None:
    saga = definition.Saga("shop.store-error", Order)

    async def undo(s: Order, tx: object) -> None:
        raise error

    @saga.step(undo=undo)
    async def first(s: Order, tx: object) -> None:
        return None

    @saga.step()
    async def second(s: Order, tx: object) -> None:
        raise ValueError("no")

    @saga.step()
    async def write(s: Order, tx: object) -> None:
        raise error

    with pytest.raises(type(error)):
        await engine.start(saga, "o1", Order(order_id="o1"), run_local)  # second fails; first's undo raises
    saga.steps.pop(1)
    with pytest.raises(type(error)):
        await engine.start(saga, "o1", Order(order_id="o1"), run_local)  # write raises


async def test_a_local_step_whose_statement_is_refused_fails_and_the_saga_compensates() -> None:
    saga = make()
    saga.steps[-1].local = _refused
    instance = await started(saga)
    instance = (await engine.reply(saga, instance, "1", True, {"charge_id": "c1"}, run_local)).instance
    assert instance is not None
    after = await engine.reply(saga, instance, "2", True, {}, run_local)
    assert after.instance is not None and after.instance.status is Status.COMPENSATING
    assert [(s.topic, s.kind) for s in after.sends] == [("inventory.release", "undo")]
    assert "StatementError" in (after.instance.error or "")


async def test_a_local_undo_whose_statement_is_refused_is_retried_like_any_failed_undo() -> None:
    saga = make(local_fails=True)
    saga.steps[2].undo_local = _refused
    instance = await started(saga)
    instance = (await engine.reply(saga, instance, "1", True, {"charge_id": "c1"}, run_local)).instance
    assert instance is not None
    after = await engine.reply(saga, instance, "2", True, {}, run_local)
    assert after.instance is not None and after.instance.status is Status.COMPENSATING
    assert [t.kind for t in after.timers] == ["retry"] and after.sends == []
    assert [e.event for e in after.log][-1] == "undo failed"


async def _refused(state: Order, tx: object) -> None:
    raise errors.StatementError("CHECK constraint failed: positive_amount", "sqlite:SQLITE_CONSTRAINT")


async def test_a_step_without_a_timeout_times_out_after_the_sagas_default() -> None:
    saga = make()  # reserve declares no timeout
    instance = (await engine.reply(saga, await started(saga), "1", True, {"charge_id": "c1"}, run_local)).instance
    assert instance is not None and instance.waiting == "2"
    assert engine.DEFAULT_STEP_TIMEOUT == 300
    fired = await engine.timer(saga, instance, "2", "timeout", run_local)
    assert fired.instance is not None and fired.instance.status is Status.COMPENSATING
    assert "within 300s" in (fired.instance.error or "")
    shorter = definition.Saga("shop.short", Order, step_timeout=timedelta(seconds=45))
    shorter.step(send="a.b", name="b")(lambda s: {})
    shorter.step(send="a.c", timeout=7, name="c")(lambda s: {})
    first = await engine.start(shorter, "o1", Order(order_id="o1"), run_local)
    assert [(t.kind, t.delay) for t in first.timers] == [("timeout", 45)]
    assert first.instance is not None
    second = await engine.reply(shorter, first.instance, "1", True, {}, run_local)
    assert [(t.kind, t.delay) for t in second.timers] == [("timeout", 7)]


async def compensating(saga: definition.Saga[Order]) -> engine.Instance:
    """charge replied, reserve failed: the refund (token 3) is awaited."""
    instance = (await engine.reply(saga, await started(saga), "1", True, {"charge_id": "c1"}, run_local)).instance
    assert instance is not None
    undoing = (await engine.reply(saga, instance, "2", False, {"reason": "no stock"}, run_local)).instance
    assert undoing is not None and (undoing.status, undoing.waiting) == (Status.COMPENSATING, "3")
    return undoing


async def test_an_unanswered_undo_is_re_sent_with_its_token_and_a_late_reply_to_it_is_taken() -> None:
    saga = make()
    undoing = await compensating(saga)
    unanswered = await engine.timer(saga, undoing, "3", "timeout", run_local)
    assert unanswered.instance is not None and unanswered.instance.waiting == "3"  # still the refund's reply
    assert unanswered.sends == [] and [(t.token, t.kind) for t in unanswered.timers] == [("3", "resend")]
    late = await engine.reply(saga, unanswered.instance, "3", True, {}, run_local)  # during the backoff
    assert late.instance is not None and late.instance.status is Status.COMPENSATED
    resent = await engine.timer(saga, unanswered.instance, "3", "resend", run_local)
    assert resent.instance is not None
    assert [(s.topic, s.token, s.kind, s.resend) for s in resent.sends] == [("billing.refund", "3", "undo", True)]
    assert [(t.token, t.kind) for t in resent.timers] == [("3", "timeout")]
    answered = await engine.reply(saga, resent.instance, "3", True, {}, run_local)
    assert answered.instance is not None and answered.instance.status is Status.COMPENSATED


async def test_a_failure_reply_to_an_undo_starts_a_new_try_under_a_new_token() -> None:
    saga = make()
    undoing = await compensating(saga)
    failed = await engine.reply(saga, undoing, "3", False, {"reason": "bank down"}, run_local)
    assert failed.instance is not None and [(t.token, t.kind) for t in failed.timers] == [("4", "retry")]
    stale = await engine.timer(saga, failed.instance, "3", "timeout", run_local)  # the first try's timer
    assert not stale.changed
    retried = await engine.timer(saga, failed.instance, "4", "retry", run_local)
    assert [(s.token, s.resend) for s in retried.sends] == [("5", False)]


async def test_a_parked_saga_compensated_after_a_retry_shows_why_it_compensated_not_the_old_undo_error() -> None:
    saga = make(max_undo_attempts=1)
    instance = await started(saga)
    charged = await engine.reply(saga, instance, "1", True, {"charge_id": "c1"}, run_local)
    assert charged.instance is not None
    undoing = (await engine.reply(saga, charged.instance, "2", False, {"reason": "no stock"}, run_local)).instance
    assert undoing is not None
    parked = await engine.reply(saga, undoing, undoing.waiting or "", False, {"reason": "bank down"}, run_local)
    assert parked.instance is not None and parked.instance.status is Status.FAILED
    assert "failed 1 times" in (parked.instance.error or "")
    resumed = await engine.resume(saga, parked.instance, run_local)
    assert resumed.instance is not None
    done = await engine.reply(saga, resumed.instance, resumed.instance.waiting or "", True, {}, run_local)
    assert done.instance is not None and done.instance.status is Status.COMPENSATED
    assert done.instance.error == "step 'reserve' failed: no stock"


async def test_a_saga_parked_on_an_unanswered_undo_takes_its_late_reply_and_a_retry_re_sends_it() -> None:
    saga = make(max_undo_attempts=1)
    undoing = await compensating(saga)
    parked = await engine.timer(saga, undoing, "3", "timeout", run_local)
    assert parked.instance is not None and (parked.instance.status, parked.instance.waiting) == (Status.FAILED, "3")
    resumed = await engine.resume(saga, parked.instance, run_local)
    assert [(s.token, s.resend) for s in resumed.sends] == [("3", True)]
    late = await engine.reply(saga, parked.instance, "3", True, {}, run_local)
    assert late.instance is not None and late.instance.status is Status.COMPENSATED


async def test_a_dead_lettered_command_fails_its_step_as_a_timeout_does() -> None:
    saga = make()
    instance = await started(saga)
    lost = await engine.reply(saga, instance, "1", False, {"reason": "Rejected: no"}, run_local, dead_lettered=True)
    assert lost.instance is not None and lost.instance.status is Status.COMPENSATING
    assert [(s.topic, s.kind) for s in lost.sends] == [("billing.refund", "undo")]  # the charge is undone too
    assert "dead-lettered" in (lost.instance.error or "")
    undo_lost = await engine.reply(saga, lost.instance, lost.instance.waiting or "", False, {}, run_local,
                                   dead_lettered=True)  # fmt: skip
    assert not undo_lost.changed and undo_lost.log[0].event == "undo dead-lettered"  # its timeout re-sends it


async def test_abort_undoes_the_waiting_step_too() -> None:
    saga = make()
    instance = await started(saga)
    aborted = await engine.abort(saga, instance, run_local)
    assert aborted.instance is not None and [s.topic for s in aborted.sends] == ["billing.refund"]
    with pytest.raises(errors.ConfigurationError):
        await engine.abort(saga, aborted.instance, run_local)


@pytest.mark.parametrize(
    "declare",
    [
        lambda s: s.step()(lambda state, tx: None),  # a sync local step
        lambda s: s.step(timeout=5)(_local),  # a timeout on a local step
        lambda s: s.step(send="Bad Topic")(lambda state: {}),
        lambda s: s.step(send="a.b", timeout=0)(lambda state: {}),
        lambda s: definition.Saga("shop.bad", Order, step_timeout=timedelta(0)),
    ],
)
def test_invalid_steps_are_refused_at_declaration(declare: Any) -> None:
    with pytest.raises(errors.ConfigurationError):
        declare(definition.Saga("shop.bad", Order))


async def _local(state: Order, tx: object) -> None:
    return None


def test_a_saga_needs_a_pydantic_state_and_a_valid_name() -> None:
    with pytest.raises(errors.ConfigurationError):
        definition.Saga("shop.bad", dict)  # type: ignore[type-var]
    with pytest.raises(errors.ConfigurationError):
        definition.Saga("Bad Name", Order)
