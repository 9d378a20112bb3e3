"""Runs one seed under virtual time (``looptime``) and checks the invariants at quiescence.

``python -m tests.simulation --seed 1234`` replays one seed exactly;
``--seeds N`` runs seeds 0..N-1; ``--variant NAME`` runs a deliberately broken
variant (:mod:`tests.simulation.variants`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import looptime
from conveyor.transports import memory

from tests.simulation import invariants
from tests.simulation.instruments import instrumented
from tests.simulation.variants import Variant
from tests.simulation.world import World

SETTLE = 900.0
"""Virtual seconds after the chaos phase within which the system must reach quiescence."""
NOOP_CYCLES = 2
"""Idle loop turns before looptime moves the clock (its default, 42, costs 10x the CPU and finds nothing more)."""
QUIET = 60.0
"""Virtual seconds with nothing unsettled that count as quiescence."""


@dataclass(frozen=True)
class Outcome:
    """What one seed did.

    Attributes:
        seed: the seed.
        profile: the fault profile.
        violations: the invariants it broke.
        summary: messages, dead letters and faults, for the report.
        virtual: virtual seconds simulated.
    """

    seed: int
    profile: str
    violations: list[invariants.Violation]
    summary: str
    virtual: float

    def replay(self, variant: str | None = None) -> str:
        """The one-line command that replays this seed."""
        extra = f" --variant {variant}" if variant else ""
        return f"python -m tests.simulation --seed {self.seed} --profile {self.profile}{extra}"


async def _simulate(world: World) -> bool:
    loop = asyncio.get_running_loop()
    for process in world.processes:
        await process.start()
    monkey = asyncio.create_task(world.chaos_monkey())
    await world.produce()
    await asyncio.gather(monkey)
    world.cron_stop.set()
    for process in world.processes:  # whatever the monkey left down comes back
        if not process.up:
            await process.start()
    deadline = world.plan.chaos + SETTLE
    quiet_since: float | None = None
    settled = False
    while loop.time() < deadline:
        await asyncio.sleep(5.0)
        if world.unsettled():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= QUIET:
            settled = True
            break
    for process in world.processes:
        await process.crash()
    return settled


def run(seed: int, variant: Variant | None = None, profile: str = "full") -> Outcome:
    """Simulate ``seed`` (optionally under a broken variant) and check every invariant."""
    random.seed(seed)  # the runtime's own jitter (retry and hold delays)
    world = World(seed, profile)
    loop = looptime.new_event_loop(start=0.0, noop_cycles=NOOP_CYCLES)
    logging.getLogger("conveyor").setLevel(logging.CRITICAL)
    try:
        with instrumented(world), variant(world) if variant else nullcontext():
            settled = loop.run_until_complete(_simulate(world))
            virtual = loop.time()
            found = invariants.check(world, settled)
    finally:
        _cancel_all(loop)
        loop.close()
        memory._brokers.pop(world.url.partition("://")[2], None)
    return Outcome(seed, profile, found, invariants.summary(world), virtual)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def run_many(
    seeds: range, variant: Variant | None = None, profile: str = "full", *, stop_at_first: bool = False
) -> tuple[list[Outcome], float]:
    """Run ``seeds``; return the failing outcomes and the wall-clock seconds it took."""
    started = time.perf_counter()
    failing = []
    for seed in seeds:
        outcome = run(seed, variant, profile)
        if outcome.violations:
            failing.append(outcome)
            if stop_at_first:
                break
    return failing, time.perf_counter() - started
