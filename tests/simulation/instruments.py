"""What the simulation swaps into the runtime: a virtual thread, ordered sets, and watchers of each delivery's holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from conveyor import fate, ports
from conveyor.runtime import dispatch, handling, relay, settling, threads
from conveyor.transports import memory

from tests.simulation import invariants
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


@contextlib.contextmanager
def instrumented(world: World) -> Iterator[None]:
    """Swap in the virtual thread, virtual clocks and ordered sets; watch each delivery's holds and dead letters.

    Holds are watched through ``Settler.hold`` (a hold the runtime decided,
    blaming a dependency): the time each delivery spends held while the
    blamed dependency was healthy is added up for the hold-bound invariant.
    A dead letter started while the message's effects were already committed
    is recorded for the applied-and-dead invariant (a dead letter decided
    before another copy applied the message is not: that copy came later).
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

    original_dead_letter = settling.Settler.dead_letter
    original_applied_before = handling.HandlerRunner._applied_before
    unasked: set[int] = set()  # deliveries whose inbox question went unanswered (the database kept failing it)

    async def applied_before(self: handling.HandlerRunner, delivery: ports.Delivery) -> bool | None:
        answer = await original_applied_before(self, delivery)
        if answer is None:
            unasked.add(id(delivery))
        return answer

    async def dead_letter(self: settling.Settler, delivery: ports.Delivery, attempt: int, kind: str, text: str) -> None:
        handler = self._handler.name  # a dead letter of a message whose effects are committed: the inbox knew
        number = invariants.message_number(handler, delivery.message)
        if handler != "sim.mirror" and any(h == handler and n == number for h, n, _ in world.db.table("effects")):
            found = f"{handler} {number} ({kind}, attempt {attempt})"
            if id(delivery) in unasked:  # the inbox could not say: a dead letter is the safe side (a replay dedupes)
                world.notes.append(f"{found}: dead-lettered though applied, the inbox unanswered")
            else:
                world.ledger.dead_after_applied.append(found)
        await original_dead_letter(self, delivery, attempt, kind, text)

    with contextlib.ExitStack() as stack:
        # Sets of tasks, claims and deliveries iterate by address: in insertion order instead, so a crash replays.
        for cls, attribute in (
            (dispatch.Dispatcher, "_runners"),
            (relay.Relay, "_open"),
            (memory.MemoryConsumer, "_unsettled"),
        ):
            owner, init = _ordered(cls, attribute)
            stack.callback(setattr, owner, "__init__", init)
        stack.enter_context(_patched(threads, "run", virtual_thread))
        stack.enter_context(_patched(handling.HandlerRunner, "process", process))
        stack.enter_context(_patched(settling.Settler, "hold", hold))
        stack.enter_context(_patched(settling.Settler, "dead_letter", dead_letter))
        stack.enter_context(_patched(handling.HandlerRunner, "_applied_before", applied_before))
        yield


@contextlib.contextmanager
def _patched(owner: Any, attribute: str, value: Any) -> Iterator[None]:
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, original)
