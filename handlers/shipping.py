"""Shipping: book a parcel once an order is paid, and tell the customer (a sync handler)."""

import hashlib

from conveyor import Context, on

from handlers.models import PaymentCharged, ShipmentCreated


@on("payments.charged", name="shipping.create-shipment")
async def create_shipment(payment: PaymentCharged, ctx: Context) -> None:
    """Book a parcel for a paid order."""
    tracking = "TRK" + hashlib.sha256(payment.order_id.encode()).hexdigest()[:8].upper()
    ctx.logger.info("shipment %s booked for %s", tracking, payment.order_id)
    shipment = ShipmentCreated(order_id=payment.order_id, customer=payment.customer, tracking_number=tracking)
    ctx.publish("shipments.created", shipment, key=payment.order_id)


@on("shipments.created", name="notifications.email-customer")
def email_customer(shipment: ShipmentCreated, ctx: Context) -> None:
    """Send the tracking number (plain functions run in a thread, so blocking I/O is fine)."""
    ctx.logger.info("emailed %s: parcel %s is on its way", shipment.customer, shipment.tracking_number)
