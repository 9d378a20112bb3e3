"""Events of the example application (past tense: they record what happened)."""

from pydantic import BaseModel, Field


class OrderPlaced(BaseModel):
    """A customer placed an order."""

    order_id: str = Field(min_length=1)
    customer: str
    total_cents: int


class PaymentCharged(BaseModel):
    """The order's total was charged to the customer."""

    order_id: str
    customer: str
    amount_cents: int
    payment_id: str


class ShipmentCreated(BaseModel):
    """A parcel was booked for the order."""

    order_id: str
    customer: str
    tracking_number: str
