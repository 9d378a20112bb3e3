"""Unit-testing a saga in milliseconds: no broker, no database, a clock you move.

:class:`SagaTest` runs the same transitions as the worker (:mod:`conveyor.sagas.engine`)
on one instance, keeps what it sends, and lets the test answer::

    test = SagaTest(checkout)
    await test.start(Checkout(order_id="o1", amount=10))
    assert test.sent() == [("billing.charge", {"order_id": "o1", "amount": 10})]
    await test.fail("billing.charge", reason="card declined")
    assert test.status == "compensated"

Timers (step timeouts, undo retries) fire when :meth:`SagaTest.advance` moves
the clock past them. Local steps and undos get ``tx`` (any object the test
gives, default :class:`FakeTransaction`, which records what they publish).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
import pydantic

from conveyor import errors
from conveyor.sagas import definition, engine, runtime


@dataclass(slots=True)
class FakeTransaction:
    """What a local step sees as ``tx`` in a :class:`SagaTest`: ``publish`` records, ``session`` is None."""

    published: list[tuple[str, Any]] = field(default_factory=list)
    session: Any = None

    def publish(self, topic: str, data: Any, **options: Any) -> None:
        """Record a publish."""
        self.published.append((topic, data))


@dataclass(slots=True)
class _Timer:
    due: float
    token: str
    kind: str


class SagaTest:
    """One saga instance driven by hand.

    Args:
        saga: the saga under test.
        tx: what local steps and undos get as ``tx``.
    """

    def __init__(self, saga: definition.Saga[Any], *, tx: Any = None) -> None:
        self.saga = saga
        self.tx = tx if tx is not None else FakeTransaction()
        self.now = 0.0
        self.instance: engine.Instance | None = None
        self.log: list[engine.Entry] = []
        self._sent: list[engine.Send] = []
        self._unread = 0
        self._timers: list[_Timer] = []

    async def _run_local(self, func: definition.Local, state: pydantic.BaseModel) -> None:
        await func(state, self.tx)

    def _apply(self, transition: engine.Transition) -> None:
        self.log.extend(transition.log)
        if transition.instance is None:
            return
        self.instance = transition.instance
        for send in transition.sends:  # a payload must survive the wire: JSON round trip, as in production
            payload = orjson.loads(orjson.dumps(send.payload, default=_dump))
            self._sent.append(engine.Send(send.topic, payload, send.token, send.step, send.kind))
        self._timers += [_Timer(self.now + t.delay, t.token, t.kind) for t in transition.timers]

    def _current(self) -> engine.Instance:
        if self.instance is None:
            raise AssertionError("the saga is not started: call start() first")
        return self.instance

    async def start(self, state: pydantic.BaseModel, *, id: str | None = None) -> str:  # noqa: A002
        """Start the instance (runs until its first wait); return its id."""
        instance = self.saga.instance_id(state, id)
        self._apply(await engine.start(self.saga, instance, state, self._run_local))
        return instance

    def sent(self) -> list[tuple[str, Any]]:
        """``(topic, payload)`` of each command sent since the last call."""
        new = self._sent[self._unread :]
        self._unread = len(self._sent)
        return [(s.topic, s.payload) for s in new]

    def _awaited(self, topic: str) -> str:
        current = self._current()
        for send in reversed(self._sent):
            if send.token == current.waiting and send.topic == topic:
                return send.token
        waiting = next((s.topic for s in self._sent if s.token == current.waiting), None)
        raise AssertionError(f"the saga does not wait for a reply from {topic!r} (it waits for {waiting or 'nothing'})")

    async def reply(self, topic: str, payload: Any = None) -> None:
        """Answer the awaited command sent to ``topic`` with success."""
        await self._reply(self._awaited(topic), True, payload)

    async def fail(self, topic: str, reason: str = "failed") -> None:
        """Answer the awaited command sent to ``topic`` with a failure."""
        await self._reply(self._awaited(topic), False, {"reason": reason})

    async def dead_letter(self, topic: str, reason: str = "Rejected") -> None:
        """The participant's worker dead-lettered the awaited command sent to ``topic`` (it never replies)."""
        token = self._awaited(topic)
        payload = {"reason": reason}
        self._apply(await engine.reply(self.saga, self._current(), token, False, payload, self._run_local,
                                       dead_lettered=True))  # fmt: skip

    async def reply_to_token(self, token: str, ok: bool, payload: Any = None) -> None:
        """Deliver a reply with any token: a duplicate, stale or late one changes nothing."""
        await self._reply(token, ok, payload)

    async def _reply(self, token: str, ok: bool, payload: Any) -> None:
        current = self._current()
        value = payload
        step = self.saga.steps[current.step] if current.step < len(self.saga.steps) else None
        if ok and step is not None and step.on_reply is not None and current.status is engine.Status.RUNNING:
            model = runtime.reply_model(step.on_reply)
            if model is not None and not isinstance(payload, model):
                value = model.model_validate(payload)
        self._apply(await engine.reply(self.saga, current, token, ok, value, self._run_local))

    async def advance(self, by: timedelta | float) -> None:
        """Move the clock; timers that fall due fire, in order."""
        self.now += by.total_seconds() if isinstance(by, timedelta) else by
        while True:
            due = sorted((t for t in self._timers if t.due <= self.now), key=lambda t: t.due)
            if not due:
                return
            timer = due[0]
            self._timers.remove(timer)
            self._apply(await engine.timer(self.saga, self._current(), timer.token, timer.kind, self._run_local))

    async def retry(self) -> None:
        """An operator's ``conveyor sagas retry``."""
        self._apply(await engine.resume(self.saga, self._current(), self._run_local))

    async def abort(self) -> None:
        """An operator's ``conveyor sagas abort``."""
        self._apply(await engine.abort(self.saga, self._current(), self._run_local))

    @property
    def status(self) -> str:
        """``running``, ``compensating``, ``completed``, ``compensated`` or ``failed``."""
        return self._current().status.value

    @property
    def state(self) -> Any:
        """The state, as the saga's model."""
        return self.saga.state.model_validate(self._current().state)

    @property
    def error(self) -> str | None:
        """Why it compensates or is parked."""
        return self._current().error


def _dump(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise errors.ConfigurationError(f"a saga command payload must be JSON-compatible or a pydantic model: {value!r}")
