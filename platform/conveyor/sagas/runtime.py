"""Running sagas: each saga's topic is consumed by a transactional handler that applies one transition per message.

The handler ``sagas.<name>`` is an ordinary ``@on(..., transactional=True)``
handler: its inbox row, the instance's new version, the step log and the
outbox rows of the commands and timers it sends commit in one transaction, or
none of them do (a crash anywhere replays the message, and the inbox or the
instance's token makes the replay change nothing). A saga with ``start_on``
gets a second handler, ``sagas.<name>.start``, that starts an instance from
each event of that topic in the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import typing
from typing import Any

import orjson
import pydantic
from prometheus_client import Counter, Gauge, Histogram

from conveyor import errors, registry
from conveyor.context import Context
from conveyor.envelope import Envelope
from conveyor.persistence import Persistence, UnitOfWork
from conveyor.sagas import definition, engine, wire

log = logging.getLogger("conveyor.sagas")
_WARNINGS = frozenset({"parked", "failed", "timed out", "undo failed", "dead-lettered", "undo dead-lettered"})

TRANSITIONS = Counter(
    "conveyor_saga_transitions", "Saga transitions saved, by saga and the status they led to.", ["saga", "status"]
)
INSTANCES = Gauge(
    "conveyor_sagas",
    "Saga instances in the database by saga and status (counted every 15 s by the relay process).",
    ["saga", "status"],
    multiprocess_mode="livemax",  # a database-wide count (one relay, or replicas reading alike)
)
STEP_SECONDS = Histogram(
    "conveyor_saga_step_seconds",
    "Time from sending a saga step's command to handling its reply, by saga and step.",
    ["saga", "step"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)


def handlers(saga: definition.Saga[Any], *, max_attempts: int = 10) -> list[registry.Handler]:
    """The handlers that run ``saga``: its topic's, and the ``start_on`` topic's if it has one.

    Raises:
        ConfigurationError: the saga has no steps, or ``start_on`` without ``id=``.
    """
    if not saga.steps:
        raise errors.ConfigurationError(f"saga {saga.name!r} has no steps")
    if saga.start_on is not None and saga.id_of is None:
        raise errors.ConfigurationError(
            f"saga {saga.name!r}: start_on needs id= to derive each instance's id from the starting event"
        )

    async def signals(message: Envelope, ctx: Context) -> None:
        await _apply(saga, wire.signal(message), message, ctx)

    signals.__qualname__ = signals.__name__ = f"saga_{saga.name.replace('.', '_').replace('-', '_')}"
    found = [_handler(signals, saga.topic, saga.topic, max_attempts)]
    if saga.start_on is not None:

        async def starts(message: Envelope, ctx: Context) -> None:
            state = _state(saga, message)
            await _start(saga, saga.instance_id(state, None), state, ctx)

        starts.__qualname__ = starts.__name__ = signals.__name__ + "_start"
        found.append(_handler(starts, saga.start_on, saga.topic + ".start", max_attempts))
    return found


def _handler(func: Any, topic: str, name: str, max_attempts: int) -> registry.Handler:
    registry.on(topic, name=name, transactional=True, max_attempts=max_attempts)(func)
    handler: registry.Handler = func.__conveyor_handler__
    return handler


def _state(saga: definition.Saga[Any], message: Envelope) -> pydantic.BaseModel:
    try:
        state: pydantic.BaseModel = saga.state.model_validate_json(message.data)
    except pydantic.ValidationError as exc:
        kind = saga.state.__name__
        raise errors.Reject(f"saga {saga.name}: the start event's data is not a valid {kind}: {exc}") from None
    return state


def _unit(ctx: Context) -> UnitOfWork:
    unit = ctx.unit
    if unit is None:  # transactional handlers always have one
        raise errors.ConfigurationError("a saga runs in a database transaction: set CONVEYOR_DATABASE_URL")
    return unit


def _local_runner(ctx: Context) -> engine.RunLocal:
    async def run_local(func: definition.Local, state: pydantic.BaseModel) -> None:
        transaction = await ctx.open_transaction()
        mark = len(ctx.outgoing)
        try:
            async with _unit(ctx).savepoint():
                await func(state, transaction)
        except BaseException:
            del ctx.outgoing[mark:]  # what the failed function published is undone with its writes
            raise

    return run_local


async def _start(saga: definition.Saga[Any], instance: str, state: pydantic.BaseModel, ctx: Context) -> None:
    unit = _unit(ctx)
    if await unit.sagas.load(unit.tx, saga.name, instance) is not None:
        ctx.logger.info("saga %s %s already started: this start changes nothing", saga.name, instance)
        return
    transition = await engine.start(saga, instance, state, _local_runner(ctx))
    assert transition.instance is not None
    await _send(saga, instance, transition, ctx)
    if not await unit.sagas.create(unit.tx, transition.instance):
        raise errors.ConcurrencyConflict(f"saga {saga.name} {instance} was started concurrently")
    _record(saga, instance, transition, ctx)
    await unit.sagas.log(unit.tx, saga.name, instance, transition.log)


async def _apply(saga: definition.Saga[Any], signal: wire.Signal, message: Envelope, ctx: Context) -> None:
    if signal.kind == "start":
        await _start(saga, signal.instance, _state(saga, message), ctx)
        return
    unit = _unit(ctx)
    record = await unit.sagas.load(unit.tx, saga.name, signal.instance)
    if record is None:
        raise errors.Reject(f"no instance {signal.instance!r} of saga {saga.name!r}")
    current = record.instance
    run_local = _local_runner(ctx)
    if signal.kind == "reply":
        assert signal.token is not None
        payload = _reply_payload(saga, current, message, signal.ok) if current.waiting == signal.token else None
        lost = signal.detail == wire.DEAD_LETTERED
        transition = await engine.reply(saga, current, signal.token, signal.ok, payload, run_local, dead_lettered=lost)
        if transition.changed and current.status is engine.Status.RUNNING:
            step = saga.steps[current.step].name
            STEP_SECONDS.labels(saga.name, step).observe(max(0.0, time.time() - record.updated_at.timestamp()))
    elif signal.kind == "timer":
        assert signal.token is not None and signal.detail is not None
        transition = await engine.timer(saga, current, signal.token, signal.detail, run_local)
    else:
        act = engine.resume if signal.detail == "retry" else engine.abort
        try:
            transition = await act(saga, current, run_local)
        except errors.ConfigurationError as exc:
            transition = engine.Transition(None, log=[engine.Entry("", "ignored", f"{signal.detail}: {exc}")])
    await _send(saga, signal.instance, transition, ctx)
    if transition.instance is not None:
        await unit.sagas.save(unit.tx, transition.instance)
        fired = signal.kind == "timer" and signal.token == current.waiting  # its row is the one being handled
        if current.timer_id is not None and not fired and current.timer_id != transition.instance.timer_id:
            await unit.sagas.cancel_timer(unit.tx, current.timer_id)
    _record(saga, signal.instance, transition, ctx)
    await unit.sagas.log(unit.tx, saga.name, signal.instance, transition.log)


def _reply_payload(saga: definition.Saga[Any], instance: engine.Instance, message: Envelope, ok: bool) -> Any:
    if not message.data:
        return None
    try:
        value = orjson.loads(message.data)
    except orjson.JSONDecodeError as exc:
        raise errors.Reject(f"saga {saga.name}: a reply's data is not JSON: {exc}") from None
    step = saga.steps[instance.step] if instance.step < len(saga.steps) else None
    model = reply_model(step.on_reply) if step is not None and step.on_reply is not None else None
    if not ok or step is None or model is None or instance.status is not engine.Status.RUNNING:
        return value
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as exc:
        what = f"the reply to step {step.name!r} is not a {model.__name__}"
        raise errors.Reject(f"saga {saga.name}: {what}: {exc}") from None


def reply_model(func: definition.Replied) -> type[pydantic.BaseModel] | None:
    """The pydantic model a reply hook's second parameter is annotated with, if any."""
    try:
        hints = typing.get_type_hints(func)
    except (NameError, TypeError):
        return None
    params = [p for p in hints if p != "return"]
    kind = hints.get(params[1]) if len(params) > 1 else None
    return kind if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel) else None


async def _send(saga: definition.Saga[Any], instance: str, transition: engine.Transition, ctx: Context) -> None:
    """Publish the transition's commands and timers; note the awaited timer's id on the new instance."""
    unit = _unit(ctx)
    for send in transition.sends:
        command = ctx.publish(send.topic, send.payload, key=instance,
                              extensions=wire.command(instance, send.token, saga.topic))  # fmt: skip
        command.id = wire.command_id(saga.name, instance, send.step, send.kind, send.token)
        if send.resend:  # the same message again: the outbox forgets it was sent
            await unit.sagas.release_command(unit.tx, command.scoped_id)
    timer_id = None
    for timer in transition.timers:
        extensions = {wire.INSTANCE: instance, wire.TOKEN: timer.token, wire.TIMER_KIND: timer.kind}
        event = ctx.publish(saga.topic, None, key=instance, type=wire.TIMER, extensions=extensions, delay=timer.delay)
        if transition.instance is not None and timer.token == transition.instance.waiting:
            timer_id = event.scoped_id
    if transition.instance is not None:
        transition.instance = dataclasses.replace(transition.instance, timer_id=timer_id)


def _record(saga: definition.Saga[Any], instance: str, transition: engine.Transition, ctx: Context) -> None:
    for entry in transition.log:
        level = logging.WARNING if entry.event in _WARNINGS else logging.INFO
        step = f" step {entry.step}" if entry.step else ""
        ctx.logger.log(level, "saga %s %s%s: %s%s", saga.name, instance, step, entry.event,
                       f" ({entry.detail})" if entry.detail else "")  # fmt: skip
    if transition.instance is not None:
        TRANSITIONS.labels(saga.name, transition.instance.status.value).inc()


async def report(
    stores: Persistence, sagas: list[definition.Saga[Any]], stop: asyncio.Event, interval: float = 15.0
) -> None:
    """Refresh ``conveyor_sagas{saga,status}`` from the database now, then every ``interval`` seconds until ``stop``."""
    while True:
        try:
            async with stores.database.transaction(readonly=True) as tx:
                counts = await stores.sagas.counts(tx)
            for saga in sagas:
                for status in engine.Status:
                    INSTANCES.labels(saga.name, status.value).set(counts.get((saga.name, status.value), 0))
        except errors.StoreError as exc:
            log.warning("could not count saga instances: %s", exc)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
