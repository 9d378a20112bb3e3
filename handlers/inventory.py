"""Inventory: reserve stock for an order, release it when the checkout saga undoes the reservation."""

from conveyor import Context, on


@on("inventory.reserve", name="inventory.reserve-stock")
async def reserve_stock(command: dict, ctx: Context) -> None:
    """Reserve the order's items."""
    ctx.logger.info("reserved %d item(s) for %s", command["items"], command["order_id"])
    ctx.reply({"reserved": command["items"]})


@on("inventory.release", name="inventory.release-stock")
async def release_stock(command: dict, ctx: Context) -> None:
    """Release a reservation."""
    ctx.logger.info("released %d item(s) of %s", command["items"], command["order_id"])
    ctx.reply()
