"""The simulated saga ``sim.trip``: book a hotel, book a car, pay; a declined payment undoes the car, then the hotel.

Participants are transactional handlers that record their effects in the
ledger (``effects``) in the same transaction as their reply. They are
idempotent as real participants must be: an undo is recorded once per trip
(a unique marker row), and a booking that arrives after its undo (the step
timed out, the undo went first) is not made.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import pydantic
from conveyor import Context
from conveyor.memory_persistence import MemoryTx
from conveyor.registry import on
from conveyor.sagas.definition import Saga

STEP_TIMEOUT = timedelta(seconds=60)
SERVICES = ("hotel", "car")
PARTICIPANT: dict[str, Any] = {"transactional": True, "max_attempts": 3, "timeout": 5.0}
LEDGER = "trip_effects"
"""The participants' ledger table: ``(what, service, trip, run) -> value``."""


class Trip(pydantic.BaseModel):
    """The saga's state."""

    trip: str


def declined(seed: int, trip: str) -> bool:
    """Whether the payment of ``trip`` is declined (then the saga compensates)."""
    return random.Random(f"{seed}/pay/{trip}").random() < 0.35


def saga() -> Saga[Trip]:
    """The saga definition."""
    trips: Saga[Trip] = Saga("sim.trip", Trip, id=lambda s: s.trip, start_on="sim.trips")

    @trips.step(send="sim.hotel.book", undo="sim.hotel.cancel", timeout=STEP_TIMEOUT)
    def hotel(s: Trip) -> dict[str, Any]:
        return {"trip": s.trip}

    @trips.step(send="sim.car.book", undo="sim.car.cancel", timeout=STEP_TIMEOUT)
    def car(s: Trip) -> dict[str, Any]:
        return {"trip": s.trip}

    @trips.step(send="sim.pay", timeout=STEP_TIMEOUT)
    def pay(s: Trip) -> dict[str, Any]:
        return {"trip": s.trip}

    return trips


async def _record(ctx: Context, key: tuple[str, ...]) -> MemoryTx:
    """Open the attempt's transaction and return its handle (labelled for the fault hook)."""
    tx = await ctx.open_transaction()
    session: MemoryTx = tx.session  # type: ignore[assignment]
    session.labels["message"], session.labels["attempt"] = "/".join(key), ctx.message.attempt
    return session


def participants(
    seed: int, behave: Callable[[str, str, int], Awaitable[None]], runs: Iterator[int]
) -> list[Callable[..., Any]]:
    """The participants' handlers.

    Args:
        seed: the seed (declined payments).
        behave: ``behave(handler, trip, attempt)`` makes an attempt fail, run slow or overrun, per the seed.
        runs: unique numbers for ledger rows, so an effect applied twice shows as two rows.
    """

    async def pay(payload: dict[str, Any], ctx: Context) -> None:
        trip = str(payload["trip"])
        session = await _record(ctx, ("pay", trip))
        if declined(seed, trip):
            ctx.reply(failed=True, reason="card declined")
            return
        await session.insert(LEDGER, ("pay", "-", trip, next(runs)), ctx.message.attempt)
        ctx.reply({"paid": True})
        await behave("sim.pay", trip, ctx.message.attempt)
        session.labels["returned"] = True

    found = [on("sim.pay", name="sim.pay", **PARTICIPANT)(pay)]
    for service in SERVICES:
        found += _service(service, behave, runs)
    return found


def _service(
    service: str, behave: Callable[[str, str, int], Awaitable[None]], runs: Iterator[int]
) -> list[Callable[..., Any]]:
    """A booking participant: its ``book`` and ``cancel`` handlers."""

    async def book(payload: dict[str, Any], ctx: Context) -> None:
        trip = str(payload["trip"])
        session = await _record(ctx, ("book", service, trip))
        if await session.read("undone", (service, trip)) is None:  # a late booking after its undo: not made
            await session.insert(LEDGER, ("book", service, trip, next(runs)), ctx.message.attempt)
        ctx.reply({"booked": service})
        await behave(f"sim.{service}", trip, ctx.message.attempt)
        session.labels["returned"] = True

    async def cancel(payload: dict[str, Any], ctx: Context) -> None:
        trip = str(payload["trip"])
        session = await _record(ctx, ("undo", service, trip))
        if await session.read("undone", (service, trip)) is None:
            now = asyncio.get_running_loop().time()
            await session.insert("undone", (service, trip), now)
            await session.insert(LEDGER, ("undo", service, trip, next(runs)), now)
        ctx.reply({"cancelled": service})
        session.labels["returned"] = True

    undo = {**PARTICIPANT, "max_attempts": 10}
    return [
        on(f"sim.{service}.book", name=f"sim.{service}", **PARTICIPANT)(book),
        on(f"sim.{service}.cancel", name=f"sim.{service}.undo", **undo)(cancel),
    ]
