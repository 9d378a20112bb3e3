"""Messages of the example application: events in the past tense, commands in the imperative."""

from pydantic import BaseModel, Field


class OrderPlaced(BaseModel):
    """A customer placed an order."""

    order_id: str = Field(min_length=1)
    customer: str
    total_cents: int


class Checkout(BaseModel):
    """The checkout saga's state: the order, then what each step gave back."""

    order_id: str = Field(min_length=1)
    customer: str
    total_cents: int = Field(gt=0)
    payment_id: str | None = None
    tracking_number: str | None = None


class ChargeCard(BaseModel):
    """Command to billing: charge the order's total (its undo, a refund, carries the same fields)."""

    order_id: str
    customer: str
    amount_cents: int


class PaymentCharged(BaseModel):
    """Billing's reply: the order's total was charged."""

    order_id: str
    payment_id: str


class ShipmentCreated(BaseModel):
    """A parcel was booked for the order."""

    order_id: str
    customer: str
    tracking_number: str
