"""Shipping: book a parcel for a paid order, and tell the customer (a sync handler)."""

import hashlib

from conveyor import Context, on

from handlers.models import ShipmentCreated


@on("shipping.book", name="shipping.create-shipment", publishes={"shipments.created": ShipmentCreated})
async def create_shipment(command: dict, ctx: Context) -> None:
    """Book a parcel; the reply carries the tracking number, and ``shipments.created`` tells everyone else."""
    order_id = command["order_id"]
    tracking = "TRK" + hashlib.sha256(order_id.encode()).hexdigest()[:8].upper()
    ctx.logger.info("shipment %s booked for %s", tracking, order_id)
    ctx.reply({"tracking_number": tracking})
    shipment = ShipmentCreated(order_id=order_id, customer=command["customer"], tracking_number=tracking)
    ctx.publish("shipments.created", shipment, key=order_id)


@on("shipments.created", name="notifications.email-customer")
def email_customer(shipment: ShipmentCreated, ctx: Context) -> None:
    """Send the tracking number (plain functions run in a thread, so blocking I/O is fine)."""
    ctx.logger.info("emailed %s: parcel %s is on its way", shipment.customer, shipment.tracking_number)
