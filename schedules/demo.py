"""A schedule that drives the example flow, so `conveyor run` shows events moving with no input."""

import itertools
import logging
from datetime import timedelta

from conveyor import Context, every

from handlers.models import OrderPlaced

log = logging.getLogger("schedules.demo")
_orders = itertools.count(1)


@every(timedelta(seconds=5), name="demo.place-order", misfire="skip", publishes={"orders.placed": OrderPlaced})
async def place_demo_order(ctx: Context) -> None:
    """Place an order every five seconds: every fourth is large (its first charge attempt fails), every
    fifth is over the card limit (billing declines it, and the checkout saga releases its stock)."""
    n = next(_orders)
    total = 60_000 if n % 5 == 0 else 12_500 if n % 4 == 0 else 1_000 + n
    order = OrderPlaced(order_id=f"demo-{ctx.message.id[:8]}", customer=f"customer{n}@example.com", total_cents=total)
    async with ctx.transaction() as tx:
        tx.publish("orders.placed", order, key=order.order_id)
    log.info("placed demo order %s (%d cents)", order.order_id, order.total_cents)
