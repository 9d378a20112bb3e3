"""The seeded fault plan, and the proxies that consult it: the database's fault hook and a faulty transport.

Everything random comes from the plan's ``random.Random(seed)`` (or from a
per-message ``Random`` derived from the seed and the message), so a seed
replays exactly. Faults are drawn only during the chaos phase
(:attr:`FaultPlan.chaos`); afterwards the system must settle, except for the
*sticky* faults of a few cursed messages (a statement that always violates a
constraint, a commit that always hangs), which last for ever, as a poison
message's would.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from conveyor import errors, ports
from conveyor.envelope import WireMessage
from conveyor.memory_persistence import MemoryTx
from conveyor.transports.memory import MemoryDelivery, MemoryTransport

OUTAGE_MARK = "[outage]"
"""Ends the text of every error injected during an outage window: a dead letter naming one was spent by an outage.

A connection error injected while the dependency answers its probe carries no
mark: the runtime may charge it to the attempt (it passed the probe)."""
HANG = 30.0
"""How long a hanging call hangs (virtual seconds) before it fails as a timed-out connection."""

INFRA = "infra"
"""The label under which a transaction counts the infrastructure faults injected into it."""


@dataclass
class Outage:
    """A window of virtual time during which a dependency is down."""

    what: str  # "database" or "broker"
    start: float
    end: float


@dataclass
class FaultPlan:
    """What fails, when, for one seed.

    Attributes:
        seed: the seed.
        rng: the plan's random source (order of draws follows the simulation, which is deterministic).
        chaos: virtual seconds from the start during which random faults are drawn.
        db_rate: chance that a database call fails (outside outages).
        broker_rate: chance that a broker call fails.
        outages: windows during which a dependency refuses every call.
        cursed: message numbers whose statements always fail, and how (``constraint`` or ``hang``).
        injected: how many faults were injected, by kind (for the report).
    """

    seed: int
    rng: random.Random = field(init=False)
    chaos: float = 240.0
    db_rate: float = 0.0
    broker_rate: float = 0.0
    outages: list[Outage] = field(default_factory=list)
    cursed: dict[str, str] = field(default_factory=dict)
    injected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.db_rate = self.rng.choice([0.0, 0.01, 0.03, 0.08])
        self.broker_rate = self.rng.choice([0.0, 0.01, 0.03, 0.08])
        for what in ("database", "broker"):
            if self.rng.random() < 0.4:
                start = self.rng.uniform(10, self.chaos - 60)
                self.outages.append(Outage(what, start, start + self.rng.uniform(5, 60)))

    def count(self, kind: str) -> None:
        """Record an injected fault."""
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def down(self, what: str, now: float) -> bool:
        """True while ``what`` is in an outage window."""
        return any(o.what == what and o.start <= now < o.end for o in self.outages)

    def healthy(self, what: str, now: float) -> bool:
        """True when ``what`` answers its probe (no outage window)."""
        return not self.down(what, now)

    def chance(self, rate: float, now: float) -> bool:
        """A random fault during the chaos phase."""
        return now < self.chaos and rate > 0 and self.rng.random() < rate


class DatabaseFaults:
    """The memory database's fault hook: raises or hangs per the plan.

    Args:
        plan: the fault plan.
    """

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.classify: Callable[[errors.StoreError], errors.StoreError] = lambda exc: exc
        """Maps an injected error to what the adapter reports (a broken variant misclassifies here)."""

    async def __call__(self, operation: str, tx: MemoryTx | None) -> None:
        if tx is not None:  # a statement in a transaction lets other tasks run, as a real driver's round trip does
            await asyncio.sleep(0)
        try:
            await self._fault(operation, tx)
        except errors.StoreError as exc:
            if tx is not None and not isinstance(exc, errors.StatementError):
                tx.labels[INFRA] = tx.labels.get(INFRA, 0) + 1
            raise self.classify(exc) from None
        except asyncio.CancelledError:  # a hang cut short by the attempt's deadline
            if tx is not None and (operation in ("commit", "inbox.claim") or tx.labels.get("returned")):
                tx.labels[INFRA] = tx.labels.get(INFRA, 0) + 1  # Conveyor's own step (the commit): the database's
            raise

    async def _fault(self, operation: str, tx: MemoryTx | None) -> None:
        plan = self.plan
        now = asyncio.get_running_loop().time()
        message = None if tx is None else tx.labels.get("message")
        sticky = plan.cursed.get(message) if message is not None else None
        if sticky == "constraint" and operation == "write":
            plan.count("sticky constraint")
            raise errors.StatementError("duplicate key value violates unique constraint", "23505")
        if sticky == "hang" and operation == "commit":
            plan.count("sticky hang")
            await asyncio.sleep(HANG)
            raise errors.StoreUnavailable("the connection timed out")
        if operation == "check":  # the probe: it fails while the database is down, and only then
            if plan.down("database", now):
                raise errors.StoreUnavailable("connection refused [outage]")
            return
        if plan.down("database", now) and operation != "commit.after":
            plan.count("db outage")
            raise errors.StoreUnavailable("connection refused [outage]")
        if not plan.chance(plan.db_rate, now):
            return
        if operation == "commit.after":  # committed, but the answer was lost with the connection
            plan.count("db lost commit answer")
            raise errors.StoreUnavailable("server closed the connection unexpectedly")
        kind = plan.rng.choice(["connection", "statement", "constraint", "hang"])
        plan.count(f"db {kind}")
        if kind == "connection":
            raise errors.StoreUnavailable("server closed the connection unexpectedly")
        if kind == "statement" and operation in ("write", "read"):
            raise errors.StatementError("invalid input syntax", "22P02")
        if kind == "constraint" and operation == "write":
            raise errors.StatementError("duplicate key value violates unique constraint", "23505")
        if kind == "hang":
            await asyncio.sleep(plan.rng.uniform(1, HANG))
            raise errors.StoreUnavailable("the connection timed out")


class FaultyDelivery:
    """A memory delivery whose ack or nack may be lost (the broker then redelivers it)."""

    def __init__(self, inner: MemoryDelivery, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan
        self.topic = inner.topic
        self.message = inner.message
        self.attempt = inner.attempt

    async def _lost(self, what: str) -> bool:
        plan = self._plan
        now = asyncio.get_running_loop().time()
        if plan.down("broker", now) or plan.chance(plan.broker_rate, now):
            plan.count(f"broker lost {what}")
            # The broker never got it: once the connection is back (a moment later) it delivers the message again.
            await self._inner.nack(plan.rng.uniform(0.5, 5.0))
            return True
        return False

    async def ack(self) -> None:
        """Settle as done, unless the ack is lost.

        Raises:
            TransientTransportError: the ack was lost.
        """
        if await self._lost("ack"):
            raise errors.TransientTransportError("channel closed before the ack")
        await self._inner.ack()

    async def nack(self, delay: float) -> None:
        """Redeliver after ``delay``, or at once if the nack is lost.

        Raises:
            TransientTransportError: the nack was lost.
        """
        if await self._lost("nack"):
            raise errors.TransientTransportError("channel closed before the nack")
        await self._inner.nack(delay)


class FaultyTransport:
    """A memory transport whose calls fail, hang or duplicate deliveries per the plan.

    Args:
        inner: the memory transport of the simulated process.
        plan: the fault plan.
    """

    def __init__(self, inner: MemoryTransport, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.features = inner.features
        self.binary_prefix = inner.binary_prefix

    async def _fault(self) -> None:
        plan = self.plan
        now = asyncio.get_running_loop().time()
        if plan.down("broker", now):
            plan.count("broker outage")
            raise errors.TransientTransportError("connection refused [outage]")
        if not plan.chance(plan.broker_rate, now):
            return
        kind = plan.rng.choice(["unreachable", "hang", "refused"])
        plan.count(f"broker {kind}")
        if kind == "refused":
            raise errors.TransportError("the broker refused the message")
        if kind == "hang":
            await asyncio.sleep(plan.rng.uniform(1, 60))
        raise errors.TransientTransportError("the broker did not confirm in time")

    def duplicated(self, delivery: ports.Delivery) -> None:
        """A delivery was duplicated (a subclass counts it)."""

    async def connect(self) -> None:
        """Connect the inner transport."""
        await self.inner.connect()

    async def close(self) -> None:
        """Close the inner transport (unsettled deliveries are redelivered)."""
        await self.inner.close()

    async def declare(self, topics: Sequence[str], subscriptions: Sequence[ports.Subscription]) -> None:
        """Declare on the inner transport."""
        await self.inner.declare(topics, subscriptions)

    async def publish(self, topic: str, message: WireMessage) -> None:
        """Publish, unless the plan fails the call.

        Raises:
            TransientTransportError: an injected outage or timeout.
        """
        await self._fault()
        await self.inner.publish(topic, message)

    async def publish_many(self, messages: Sequence[tuple[str, WireMessage]]) -> list[Exception | None]:
        """Publish each message, failing some per the plan."""
        results: list[Exception | None] = []
        for topic, message in messages:
            try:
                await self.publish(topic, message)
            except errors.TransportError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    async def subscribe(self, subscription: ports.Subscription, callback: ports.DeliveryCallback) -> ports.Consumer:
        """Subscribe; each delivery may be duplicated (the broker delivers it twice) before it is handed on."""
        plan = self.plan
        inner = self.inner
        group = inner.broker.declare(subscription)

        async def deliver(delivery: ports.Delivery) -> None:
            assert isinstance(delivery, MemoryDelivery)
            now = asyncio.get_running_loop().time()
            if plan.chance(plan.broker_rate, now):
                plan.count("broker duplicate")
                self.duplicated(delivery)
                inner.broker.redeliver(group, delivery.item)
            await callback(FaultyDelivery(delivery, plan))

        return await inner.subscribe(subscription, deliver)

    async def backlog(self, subscription: ports.Subscription) -> ports.Backlog:
        """The inner transport's backlog."""
        return await self.inner.backlog(subscription)

    async def check(self) -> None:
        """Reachable unless in an outage.

        Raises:
            TransientTransportError: the broker is down.
        """
        if self.plan.down("broker", asyncio.get_running_loop().time()):
            raise errors.TransientTransportError("connection refused [outage]")
        await self.inner.check()
