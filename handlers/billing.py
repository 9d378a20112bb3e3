"""Billing: charge each order once (an event stream per payment), decline large ones, refund on request."""

import hashlib

from conveyor import ConcurrencyConflict, Context, NewEvent, Reject, Retry, on

from handlers.models import ChargeCard, PaymentCharged

LARGE_ORDER_CENTS = 10_000
DECLINE_ABOVE_CENTS = 50_000


class GatewayTimeout(Exception):
    """The (simulated) payment gateway did not answer in time."""


def _charge(command: ChargeCard, attempt: int) -> str:
    """Simulated payment gateway: large charges time out on their first attempt."""
    if command.amount_cents >= LARGE_ORDER_CENTS and attempt == 1:
        raise GatewayTimeout(f"gateway timed out charging {command.amount_cents} cents for {command.order_id}")
    return "pay-" + hashlib.sha256(command.order_id.encode()).hexdigest()[:10]


@on("billing.charge", name="billing.charge-order", max_attempts=5)
async def charge_order(command: ChargeCard, ctx: Context) -> None:
    """Charge the order's total; the charge, the inbox mark and the reply commit together."""
    if command.amount_cents > DECLINE_ABOVE_CENTS:
        ctx.logger.warning("declined %s: %d cents is over the card limit", command.order_id, command.amount_cents)
        ctx.reply(failed=True, reason="card declined")
        return
    payment_id = _charge(command, ctx.message.attempt)
    stream = f"payment-{command.order_id}"
    try:
        async with ctx.transaction() as tx:
            history = [event.type for event in await tx.events.read_stream(stream)]
            if "ChargeVoided" in history:
                ctx.logger.warning("refused to charge %s: the checkout gave up on it", command.order_id)
                return
            if "PaymentCharged" in history:
                raise Reject(f"order {command.order_id} was already charged")
            # expected_version=0: a refund that voids the stream meanwhile makes this append fail.
            charge = NewEvent(type="PaymentCharged", data=command.model_dump_json().encode())
            await tx.events.append(stream, [charge], expected_version=0)
            ctx.reply(PaymentCharged(order_id=command.order_id, payment_id=payment_id))
    except ConcurrencyConflict:
        raise Retry(delay=0.1, reason=f"the payment of {command.order_id} changed while charging it") from None
    ctx.logger.info("charged %s: %d cents (%s)", command.order_id, command.amount_cents, payment_id)


@on("billing.refund", name="billing.refund-order")
async def refund_order(command: ChargeCard, ctx: Context) -> None:
    """Refund a charge the checkout saga undoes.

    The refund may arrive before the charge it undoes (the charge timed out and
    is still on its way): it then voids the order's payment stream, so the late
    charge is refused.
    """
    stream = f"payment-{command.order_id}"
    async with ctx.transaction() as tx:
        history = [event.type for event in await tx.events.read_stream(stream)]
        ctx.reply()
        if not history:
            void = NewEvent(type="ChargeVoided", data=command.model_dump_json().encode())
            await tx.events.append(stream, [void], expected_version=0)
            ctx.logger.info("voided the payment of %s before any charge", command.order_id)
            return
        if "PaymentCharged" not in history or "PaymentRefunded" in history:
            ctx.logger.info("nothing to refund for %s", command.order_id)
            return
        refund = NewEvent(type="PaymentRefunded", data=command.model_dump_json().encode())
        await tx.events.append(stream, [refund], expected_version=len(history))
    ctx.logger.info("refunded %s: %d cents", command.order_id, command.amount_cents)
