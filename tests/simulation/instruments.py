"""What the simulation swaps into the runtime: a virtual thread, ordered sets, and watchers of each delivery's holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from conveyor import fate, ports
from conveyor.runtime import dispatch, handling, probes, relay, settling, threads
from conveyor.transports import memory

from tests.simulation.world import World


def virtual_thread(func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """``threads.run`` on the virtual clock: the function runs at once, its thread "takes" what it returns.

    A simulated sync handler returns how many seconds its thread runs; the
    future resolves (or fails) that much later, so timeouts and the wait for a
    timed-out thread happen as with a real thread, deterministically.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def finish(error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        seconds = float(func(*args))
    except BaseException as exc:  # handed to the future, as a thread's error is
        loop.call_later(0.01, finish, exc)
    else:
        loop.call_later(seconds, finish, None)
    return future


class OrderedSet(dict[Any, None]):
    """A set that iterates in insertion order: the runtime's sets of tasks and deliveries, made replayable."""

    def add(self, item: Any) -> None:
        """Add ``item``."""
        self[item] = None

    def discard(self, item: Any) -> None:
        """Remove ``item`` if present."""
        self.pop(item, None)


def _ordered(cls: type, attribute: str) -> tuple[type, Any]:
    """Patch ``cls.__init__`` so that its set ``attribute`` is an :class:`OrderedSet`; return what to restore."""
    original = vars(cls)["__init__"]

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        setattr(self, attribute, OrderedSet())

    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses a plain assignment to __init__
    return cls, original


class LoopClock:
    """A stand-in for the ``time`` module whose ``monotonic`` is the loop's (virtual) clock."""

    @staticmethod
    def monotonic() -> float:
        """The running loop's time."""
        return asyncio.get_running_loop().time()

    @staticmethod
    def perf_counter() -> float:
        """The running loop's time."""
        return asyncio.get_running_loop().time()


@contextlib.contextmanager
def instrumented(world: World) -> Iterator[None]:
    """Swap in the virtual thread, virtual clocks and ordered sets; watch each delivery's holds.

    Holds are watched through ``Settler.hold`` (a hold the runtime decided,
    blaming a dependency): the time each delivery spends held while the
    blamed dependency was healthy is added up for the hold-bound invariant.
    """
    original_process = handling.HandlerRunner.process
    original_hold = settling.Settler.hold
    current: dict[int, int] = {}  # task id -> delivery token

    async def process(self: handling.HandlerRunner, delivery: ports.Delivery) -> None:
        task = id(asyncio.current_task())
        token = len(world.ledger.hold_owner)
        current[task] = token
        world.ledger.hold_owner[token] = f"{self.handler.name} attempt {delivery.attempt}"
        world.ledger.processing += 1
        try:
            await original_process(self, delivery)
        finally:
            world.ledger.processing -= 1
            current.pop(task, None)

    async def hold(self: settling.Settler, outcome: fate.Hold, tries: fate.Tries) -> fate.Tries:
        loop = asyncio.get_running_loop()
        started = loop.time()
        blamed = outcome.dependency
        healthy = blamed is not None and world.plan.healthy(blamed.value, started)
        try:
            return await original_hold(self, outcome, tries)
        finally:
            token = current.get(id(asyncio.current_task()))
            if healthy and token is not None:
                world.ledger.holds[token] = world.ledger.holds.get(token, 0.0) + loop.time() - started

    with contextlib.ExitStack() as stack:
        # Sets of tasks, claims and deliveries iterate by address: in insertion order instead, so a crash replays.
        for cls, attribute in (
            (dispatch.Dispatcher, "_runners"),
            (relay.Relay, "_open"),
            (memory.MemoryConsumer, "_unsettled"),
        ):
            owner, init = _ordered(cls, attribute)
            stack.callback(setattr, owner, "__init__", init)
        # The runtime's decisions measure holds and cache probes on the host's clock: the loop's here.
        for module in (settling, probes):
            stack.enter_context(_patched(module, "time", LoopClock))
        stack.enter_context(_patched(threads, "run", virtual_thread))
        stack.enter_context(_patched(handling.HandlerRunner, "process", process))
        stack.enter_context(_patched(settling.Settler, "hold", hold))
        yield


@contextlib.contextmanager
def _patched(owner: Any, attribute: str, value: Any) -> Iterator[None]:
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, original)
