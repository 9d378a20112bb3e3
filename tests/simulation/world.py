"""One simulated system: the real worker, relay, scheduler and saga runtime on the memory transport and persistence.

The pipeline:

* ``sim.apply`` (async, ``ctx.transaction()``) records its effect in the
  ledger table ``effects`` and publishes to ``sim.out`` through the outbox;
* ``sim.mirror`` (sync, no database) publishes to ``sim.out`` directly;
* ``sim.forward`` (async, ``transactional=True``) records its effect for every
  message of ``sim.out``;
* the schedule ``sim.tick`` (every 15 s, ``misfire="all"``) records each fire's run;
* the saga ``sim.trip`` (:mod:`tests.simulation.trips`) books a hotel and a
  car and pays, compensating last step first when the payment is declined or
  a step times out.

Each attempt behaves as its seed says (succeed, raise, ``Retry``, ``Reject``
for poison messages, run slow, overrun its timeout); a sync handler's thread
runs on the virtual clock, so a seed replays exactly. Processes (a worker, a
relay and a scheduler on their own broker connection and stores) crash and
restart: a crash cancels their tasks and drops their broker connection; only
the database and the broker keep anything.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from conveyor import Context, envelope, errors, ports, retry
from conveyor.memory_persistence import MemoryDatabase, MemoryTx, memory_persistence
from conveyor.registry import Registry, on
from conveyor.runtime import relay, scheduler, worker
from conveyor.scheduling.schedules import every
from conveyor.transports import memory

from tests.simulation import trips
from tests.simulation.faults import DatabaseFaults, FaultPlan, FaultyTransport

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
MAX_ATTEMPTS = 3
TIMEOUT = 5.0
BACKOFF = retry.RetryPolicy(initial_delay=0.5, max_delay=8.0)
HANDLERS = ("sim.apply", "sim.mirror", "sim.forward")
TICK = timedelta(seconds=15)
"""The interval of the simulated schedule ``sim.tick``."""

BEHAVIOURS = [("ok", 72), ("raise", 8), ("retry", 5), ("slow", 10), ("overrun", 5)]
POISON = 0.03
"""Chance that a message is poison for a handler: every attempt raises ``Reject``."""


@dataclass
class Ledger:
    """What the simulation saw happen, outside the durable stores (for the invariants).

    Attributes:
        runs: per ``(handler, message)``, the transactions of the attempts that got past the inbox.
        sync_runs: per message, runs of the sync handler.
        published: per topic, every message the broker confirmed (duplicates included).
        ids: per ``(handler, message)``, the message id.
        copies: per ``(topic, message id)``, how often the broker got the message (publishes and duplicates).
        sent_at: per message id, when the broker confirmed it (virtual seconds).
        holds: per delivery, seconds spent holding while the dependency was healthy.
        processing: deliveries in hand now.
        dead_after_applied: dead letters started while the message's effects were committed.
    """

    runs: dict[tuple[str, str], list[MemoryTx]] = field(default_factory=dict)
    sync_runs: Counter[str] = field(default_factory=Counter)
    ids: dict[tuple[str, str], str] = field(default_factory=dict)
    copies: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent_at: dict[str, float] = field(default_factory=dict)
    published: dict[str, list[envelope.WireMessage]] = field(default_factory=dict)
    holds: dict[int, float] = field(default_factory=dict)
    hold_owner: dict[int, str] = field(default_factory=dict)
    processing: int = 0
    dead_after_applied: list[str] = field(default_factory=list)


def behaviour(seed: int, handler: str, message: str, attempt: int) -> str:
    """How an attempt behaves: drawn from the seed and the attempt alone, whatever the schedule."""
    if random.Random(f"{seed}/{handler}/{message}").random() < POISON:
        return "reject"
    rng = random.Random(f"{seed}/{handler}/{message}/{attempt}")
    kinds, weights = zip(*BEHAVIOURS, strict=True)
    return str(rng.choices(kinds, weights)[0])


class Recording(FaultyTransport):
    """A faulty transport that records every publish the broker confirmed."""

    def __init__(self, inner: memory.MemoryTransport, plan: FaultPlan, ledger: Ledger) -> None:
        super().__init__(inner, plan)
        self.ledger = ledger

    async def publish(self, topic: str, message: envelope.WireMessage) -> None:
        """Publish and record."""
        await super().publish(topic, message)
        self.ledger.published.setdefault(topic, []).append(message)
        self.ledger.sent_at[message.message_id or ""] = asyncio.get_running_loop().time()
        self.ledger.copies[topic, message.message_id or ""] += 1

    def duplicated(self, delivery: ports.Delivery) -> None:
        """Count a duplicate delivery."""
        self.ledger.copies[delivery.topic, delivery.message.message_id or ""] += 1


class Process:
    """One service process: a worker and a relay with their own broker connection and stores."""

    def __init__(self, world: World, number: int) -> None:
        self.world = world
        self.number = number
        self.worker: worker.Worker | None = None
        self.transport: Recording | None = None
        self.relay_task: asyncio.Task[None] | None = None
        self.cron_task: asyncio.Task[None] | None = None
        self.up = False

    async def start(self) -> None:
        """Connect, subscribe every handler and start the relay."""
        world = self.world
        stores = memory_persistence("sim", db=world.db)
        self.transport = Recording(memory.MemoryTransport(world.url), world.plan, world.ledger)
        await self.transport.connect()
        jobs = scheduler.job_handlers(world.schedules, stores)
        self.worker = worker.Worker(
            [*world.handlers, *jobs], self.transport, source="sim", concurrency=4,
            transactions=stores.units, dead_letters=stores.dead_letters,
        )  # fmt: skip
        await self.worker.start()
        options = relay.RelayOptions(
            batch_size=50, poll_interval=1.0, retry_base=0.5, retry_max=5.0, max_backoff=5.0, metrics_interval=60.0
        )
        publisher = relay.Relay(stores.relay_store(), self.transport, options=options)
        self.relay_task = asyncio.create_task(publisher.run(asyncio.Event()), name=f"sim-relay-{self.number}")
        cron = scheduler.Scheduler(
            world.schedules, stores, source="sim", options=scheduler.SchedulerOptions(max_sleep=TICK.total_seconds())
        )
        self.cron_task = asyncio.create_task(cron.run(world.cron_stop), name=f"sim-scheduler-{self.number}")
        self.up = True

    async def crash(self) -> None:
        """Die: every task cancelled, the broker connection dropped (its unsettled deliveries come back)."""
        self.up = False
        for task in (self.cron_task, self.relay_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop(0)
        if self.transport is not None:
            await self.transport.close()


class World:
    """Everything one seed simulates.

    Args:
        seed: the seed.
        profile: ``full`` (every fault) or ``ci`` (no message whose commit hangs for ever: today's runtime
            holds such a message without end, issue 19).
        messages: how many messages the producer sends.
    """

    def __init__(self, seed: int, profile: str = "full", messages: int = 60) -> None:
        self.seed = seed
        self.profile = profile
        self.rng = random.Random(seed ^ 0x5EED)
        self.plan = FaultPlan(seed)
        self.faults = DatabaseFaults(self.plan)
        self.db = MemoryDatabase(self.now, self.faults)
        self.url = f"memory://simulation-{seed}-{id(self)}"
        self.ledger = Ledger()
        self.messages = messages
        self.processes = [Process(self, i) for i in range(self.rng.choice([1, 1, 2]))]
        self.sent: dict[str, str | None] = {}  # message number -> key
        self.trips: list[str] = []
        self.numbers = itertools.count()
        self.cron_stop = asyncio.Event()
        """Set when the chaos phase ends: no fire after it is claimed, so the run can settle."""
        self.notes: list[str] = []
        """Findings that break no invariant (a copy dead-lettered before another copy applied the message)."""
        for n in range(messages):
            roll = self.plan.rng.random()
            if roll < 0.02:
                self.plan.cursed[str(n)] = "constraint"
            elif roll < 0.03 and profile == "full":
                self.plan.cursed[str(n)] = "hang"

        def behave(handler: str, trip: str, attempt: int) -> Awaitable[None]:
            return misbehave(behaviour(seed, handler, trip, attempt))

        registry = Registry.of(
            *self._handler_functions(), self._job(), trips.saga(), *trips.participants(seed, behave, self.numbers)
        )
        self.handlers = registry.handlers
        self.schedules = registry.schedules

    def now(self) -> datetime:
        """The database clock: the virtual clock of the loop."""
        return EPOCH + timedelta(seconds=asyncio.get_running_loop().time())

    def _handler_functions(self) -> list[Callable[..., Any]]:
        seed, ledger = self.seed, self.ledger

        @on("sim.in", name="sim.apply", max_attempts=MAX_ATTEMPTS, timeout=TIMEOUT, backoff=BACKOFF)
        async def apply(payload: dict[str, Any], ctx: Context) -> None:
            n = str(payload["n"])
            async with ctx.transaction() as tx:
                session: MemoryTx = tx.session  # type: ignore[assignment]
                session.labels["message"], session.labels["attempt"] = n, ctx.message.attempt
                ledger.runs.setdefault(("sim.apply", n), []).append(session)
                ledger.ids["sim.apply", n] = ctx.message.id
                run = len(ledger.runs["sim.apply", n])
                await session.insert("effects", ("sim.apply", n, run), ctx.message.attempt)
                tx.publish("sim.out", {"n": n, "via": "apply"}, key=payload.get("key"))
            await misbehave(behaviour(seed, "sim.apply", n, ctx.message.attempt))
            session.labels["returned"] = True  # what hangs from here on is Conveyor's commit

        @on("sim.in", name="sim.mirror", max_attempts=MAX_ATTEMPTS, timeout=TIMEOUT, backoff=BACKOFF)
        def mirror(payload: dict[str, Any], ctx: Context) -> float:
            n = str(payload["n"])
            ledger.sync_runs[n] += 1
            ctx.publish("sim.out", {"n": n, "via": "mirror"}, key=payload.get("key"))
            kind = behaviour(seed, "sim.mirror", n, ctx.message.attempt)
            if kind in ("raise", "retry", "reject"):
                raise_for(kind)
            return {"slow": TIMEOUT / 2, "overrun": TIMEOUT * 3}.get(kind, 0.01)

        @on("sim.out", name="sim.forward", max_attempts=MAX_ATTEMPTS, timeout=TIMEOUT, backoff=BACKOFF,
            transactional=True)  # fmt: skip
        async def forward(payload: dict[str, Any], ctx: Context) -> None:
            n = f"{payload['via']}:{payload['n']}"
            async with ctx.transaction() as tx:
                session: MemoryTx = tx.session  # type: ignore[assignment]
                session.labels["message"], session.labels["attempt"] = n, ctx.message.attempt
                ledger.runs.setdefault(("sim.forward", n), []).append(session)
                ledger.ids["sim.forward", n] = ctx.message.id
                await session.insert(
                    "effects", ("sim.forward", n, len(ledger.runs["sim.forward", n])), ctx.message.attempt
                )
            await misbehave(behaviour(seed, "sim.forward", n, ctx.message.attempt))
            session.labels["returned"] = True

        return [apply, mirror, forward]

    def _job(self) -> Callable[..., Any]:
        seed, ledger = self.seed, self.ledger

        @every(TICK, name="sim.tick", misfire="all", overlap="allow", timeout=TIMEOUT, max_attempts=MAX_ATTEMPTS)
        async def tick(ctx: Context) -> None:
            fire = str(orjson.loads(ctx.message.data)["fire_time"])
            async with ctx.transaction() as tx:
                session: MemoryTx = tx.session  # type: ignore[assignment]
                session.labels["message"], session.labels["attempt"] = fire, ctx.message.attempt
                ledger.runs.setdefault(("sim.tick", fire), []).append(session)
                ledger.ids["sim.tick", fire] = ctx.message.id
                await session.insert("effects", ("sim.tick", fire, len(ledger.runs["sim.tick", fire])), 1)
            await misbehave(behaviour(seed, "sim.tick", fire, ctx.message.attempt))
            session.labels["returned"] = True

        return tick

    # -- the producer, the crashes -------------------------------------------------------

    async def produce(self) -> None:
        """Send the input messages over the chaos phase (an external producer: it retries until confirmed)."""
        producer = memory.MemoryTransport(self.url)
        await producer.connect()
        keys = [f"k{i}" for i in range(self.rng.choice([1, 3, 8]))]
        spacing = (self.plan.chaos - 30) / self.messages
        for n in range(self.messages):
            await asyncio.sleep(self.rng.expovariate(1 / spacing))
            key = self.rng.choice([*keys, None])
            self.sent[str(n)] = key
            event = envelope.create("sim.in", {"n": n, "key": key}, source="producer", key=key)
            await producer.publish("sim.in", envelope.to_binary(event, producer.binary_prefix))
            self.ledger.copies["sim.in", event.id] += 1
            if n % 4 == 0:
                trip = f"t{n}"
                self.trips.append(trip)
                start = envelope.create("sim.trips", {"trip": trip}, source="producer", key=trip)
                await producer.publish("sim.trips", envelope.to_binary(start, producer.binary_prefix))

    async def chaos_monkey(self) -> None:
        """Crash a process now and then during the chaos phase; restart it after a while."""
        loop = asyncio.get_running_loop()
        rate = self.rng.choice([0.0, 1 / 120, 1 / 40])
        while rate:  # a pause drawn past the chaos phase ends with it (the settle phase would start too late)
            await asyncio.sleep(min(self.rng.expovariate(rate), max(self.plan.chaos - loop.time(), 0.0)))
            if loop.time() >= self.plan.chaos:
                return
            process = self.rng.choice(self.processes)
            if not process.up:
                continue
            self.plan.count("crash")
            await process.crash()
            await asyncio.sleep(self.rng.uniform(0.5, 30))
            await process.start()

    def subscriptions(self) -> list[ports.Subscription]:
        """The handlers' and jobs' subscriptions (not the dead-letter keepers)."""
        jobs = [ports.Subscription(name=s.topic, topic=s.topic) for s in self.schedules]
        return [ports.Subscription(name=h.name, topic=h.topic) for h in self.handlers] + jobs

    def unsettled(self) -> int:
        """Deliveries queued or in hand on the broker, plus unsent outbox rows."""
        broker = memory.broker_for(self.url)
        total = 0
        for subscription in self.subscriptions():
            backlog = broker.backlog(subscription.name)
            total += backlog.pending + (backlog.in_flight or 0)
        rows: dict[int, Any] = self.db.table("outbox")
        sagas: dict[Any, Any] = self.db.table("sagas")
        running = sum(1 for record in sagas.values() if record.instance.status.value in ("running", "compensating"))
        return total + sum(1 for row in rows.values() if row.sent_at is None) + self.ledger.processing + running


def raise_for(kind: str) -> None:
    """Raise what a failing attempt of ``kind`` raises."""
    if kind == "raise":
        raise ValueError("the handler failed")
    if kind == "retry":
        raise errors.Retry(reason="asked for a retry")
    if kind == "reject":
        raise errors.Reject("the message is invalid")


async def misbehave(kind: str) -> None:
    """The rest of an async attempt: fail, run slow or overrun the timeout, per ``kind``."""
    raise_for(kind)
    if kind == "slow":
        await asyncio.sleep(TIMEOUT / 2)
    elif kind == "overrun":
        await asyncio.sleep(TIMEOUT * 3)
