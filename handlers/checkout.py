"""The checkout saga: reserve stock, charge the card, book a parcel; undo what was done if a step fails.

An ``orders.placed`` event starts one instance per order id. Billing declines
orders above ``billing.DECLINE_ABOVE_CENTS``: the stock reserved for them is
then released. ``conveyor sagas list`` shows every instance.
"""

from conveyor import Saga

from handlers.models import ChargeCard, Checkout, PaymentCharged

checkout = Saga("shop.checkout", Checkout, id=lambda order: order.order_id, start_on="orders.placed")


@checkout.step(send="inventory.reserve", undo="inventory.release", timeout=60)
def reserve(order: Checkout) -> dict:
    return {"order_id": order.order_id, "items": 1}


@checkout.step(send="billing.charge", undo="billing.refund", timeout=60)
def charge(order: Checkout) -> ChargeCard:
    return ChargeCard(order_id=order.order_id, customer=order.customer, amount_cents=order.total_cents)


@charge.replied
def charged(order: Checkout, reply: PaymentCharged) -> None:
    order.payment_id = reply.payment_id


@checkout.step(send="shipping.book", timeout=60)
def ship(order: Checkout) -> dict:
    return {"order_id": order.order_id, "customer": order.customer}


@ship.replied
def booked(order: Checkout, reply: dict) -> None:
    order.tracking_number = reply["tracking_number"]
