"""Billing: charge each placed order once, record it as an event, reject invalid ones, retry a flaky gateway."""

import hashlib

from conveyor import ConcurrencyConflict, Context, NewEvent, Reject, on

from handlers.models import OrderPlaced, PaymentCharged

LARGE_ORDER_CENTS = 10_000


class GatewayTimeout(Exception):
    """The (simulated) payment gateway did not answer in time."""


def _charge(order: OrderPlaced, attempt: int) -> str:
    """Simulated payment gateway: large charges time out on their first attempt."""
    if order.total_cents >= LARGE_ORDER_CENTS and attempt == 1:
        raise GatewayTimeout(f"gateway timed out charging {order.total_cents} cents for {order.order_id}")
    return "pay-" + hashlib.sha256(order.order_id.encode()).hexdigest()[:10]


@on("orders.placed", name="billing.charge-order", max_attempts=5)
async def charge_order(order: OrderPlaced, ctx: Context) -> None:
    """Charge the order's total; the charge, the inbox mark and the outgoing event commit together."""
    if order.total_cents <= 0:
        raise Reject(f"order {order.order_id} has a non-positive total ({order.total_cents} cents)")
    payment_id = _charge(order, ctx.message.attempt)
    charged = PaymentCharged(
        order_id=order.order_id, customer=order.customer, amount_cents=order.total_cents, payment_id=payment_id
    )
    try:
        async with ctx.transaction() as tx:
            # A new stream per order: expected_version=0 makes a second charge of the same order fail.
            charge = NewEvent(type="PaymentCharged", data=charged.model_dump_json().encode())
            await tx.events.append(f"payment-{order.order_id}", [charge], expected_version=0)
            tx.publish("payments.charged", charged, key=order.order_id)
    except ConcurrencyConflict:
        raise Reject(f"order {order.order_id} was already charged") from None
    ctx.logger.info("charged %s: %d cents (%s)", order.order_id, order.total_cents, payment_id)
