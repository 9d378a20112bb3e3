"""Declaring a saga: a name, a typed state and ordered steps.

A saga coordinates writes that span services. Its steps run in order; each is
either *local* (a function run in the saga's own database transaction) or a
*participant* step (a command sent to a topic, then a wait for the reply that
the participant's handler sends with ``ctx.reply``). When a step fails or times
out, the *undo* of every completed step runs, in reverse order.

    checkout = Saga("shop.checkout", Checkout)

    @checkout.step(send="billing.charge", undo="billing.refund", timeout=30)
    def charge(s: Checkout) -> dict:
        return {"order_id": s.order_id, "amount": s.amount}

    @charge.replied
    def charged(s: Checkout, reply: dict) -> None:
        s.charge_id = reply["charge_id"]

A step's function builds its command's payload from the state; ``undo`` sends
the same payload to the undo topic unless ``@step.undo_payload`` builds
another. A local step is an ``async def (state, tx)``; a local undo is a
callable given as ``undo=``. Reply hooks mutate the state, which is saved with
every transition.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import pydantic

from conveyor import envelope, errors, names
from conveyor.sagas import wire

S = TypeVar("S", bound=pydantic.BaseModel)
TOPIC_PREFIX = "sagas."
DEFAULT_STEP_TIMEOUT = 300.0
"""Seconds a participant step (or an undo) waits for its reply when neither it nor its saga says otherwise."""

Build = Callable[[Any], Any]
"""Builds a command payload from the state."""
Local = Callable[[Any, Any], Awaitable[None]]
"""A local step or undo: ``async def (state, tx)``."""
Replied = Callable[[Any, Any], None]
"""Applies a successful reply's payload to the state."""


class Publishes(Protocol):
    """Anything with ``publish(topic, data, key=, type=, extensions=)``: a ``ctx``, a ``tx``, a ``Publisher``."""

    def publish(
        self,
        topic: str,
        data: Any,
        *,
        key: str | None = ...,
        type: str | None = ...,  # noqa: A002 - the CloudEvents attribute name
        extensions: Any = ...,
    ) -> Any:
        """Publish (or stage) one message."""
        ...


@dataclass(slots=True)
class Step:
    """One step of a saga, as declared.

    Attributes:
        name: the step's name (the decorated function's name unless given).
        index: its position, from 0.
        send: the topic of its command (participant step), or ``None`` (local step).
        build: the command payload builder (participant step).
        local: the function run in the saga's transaction (local step).
        undo_topic: the topic of the undo command, if any.
        undo_build: the undo payload builder (default: ``build``).
        undo_local: a local undo function, if any.
        timeout: seconds to wait for the reply before failing the step (participant
            steps: the step's ``timeout=``, else the saga's ``step_timeout``), and
            for the reply to its undo command.
        on_reply: applies a successful reply to the state.
    """

    name: str
    index: int
    send: str | None = None
    build: Build | None = field(default=None, repr=False)
    local: Local | None = field(default=None, repr=False)
    undo_topic: str | None = None
    undo_build: Build | None = field(default=None, repr=False)
    undo_local: Local | None = field(default=None, repr=False)
    timeout: float | None = None
    on_reply: Replied | None = field(default=None, repr=False)

    @property
    def has_undo(self) -> bool:
        """Whether completing this step must be undone on failure."""
        return self.undo_topic is not None or self.undo_local is not None

    def replied(self, func: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """Decorate ``func(state, reply_payload)``: applies a successful reply to the state."""
        if self.send is None:
            raise errors.ConfigurationError(f"step {self.name!r} is local: it gets no reply")
        self.on_reply = func
        return func

    def undo_payload(self, func: Build) -> Build:
        """Decorate ``func(state) -> payload``: builds the undo command's payload."""
        if self.undo_topic is None:
            raise errors.ConfigurationError(f"step {self.name!r} has no undo topic: give undo='topic' to the step")
        self.undo_build = func
        return func


class Saga(Generic[S]):
    """A saga definition: a stable name, a pydantic state type and ordered steps.

    Args:
        name: stable dotted name; keys persisted instances, its topic
            (``sagas.<name>``, which carries starts, replies and timers) and metrics.
        state: the pydantic model of the saga's state.
        id: derives the instance id (the correlation id) from the initial
            state; by default a new instance id must be given to :meth:`start`.
        max_undo_attempts: attempts of one undo before the saga is parked (``failed``).
        undo_backoff: delay before the first retry of a failed undo; doubles, capped at 10 minutes.
        start_on: a topic whose events start instances (their payload validated as ``state``).
        step_timeout: how long a participant step without ``timeout=`` waits for
            its reply, and an undo command for its own (5 minutes by default):
            no step waits for ever, so a command that is lost or never answered
            fails its step.

    Raises:
        ConfigurationError: invalid name or topic, a state type that is not a
            pydantic model, or a step timeout that is not positive.
    """

    def __init__(
        self,
        name: str,
        state: type[S],
        *,
        id: Callable[[S], str] | None = None,  # noqa: A002 - reads as the saga's id
        max_undo_attempts: int = 10,
        undo_backoff: timedelta = timedelta(seconds=1),
        start_on: str | None = None,
        step_timeout: timedelta | float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        names.check("saga name", name)
        if not (isinstance(state, type) and issubclass(state, pydantic.BaseModel)):
            raise errors.ConfigurationError(f"saga {name!r}: state must be a pydantic model class, got {state!r}")
        if max_undo_attempts < 1:
            raise errors.ConfigurationError(f"saga {name!r}: max_undo_attempts must be >= 1")
        if start_on is not None:
            names.check("topic", start_on)
        step_seconds = step_timeout.total_seconds() if isinstance(step_timeout, timedelta) else float(step_timeout)
        if step_seconds <= 0:
            raise errors.ConfigurationError(f"saga {name!r}: step_timeout must be positive")
        self.name = name
        self.state = state
        self.id_of = id
        self.max_undo_attempts = max_undo_attempts
        self.undo_backoff = undo_backoff.total_seconds()
        self.start_on = start_on
        self.step_timeout = step_seconds
        self.steps: list[Step] = []

    @property
    def topic(self) -> str:
        """The saga's own topic: starts, replies and timers go there."""
        return TOPIC_PREFIX + self.name

    def step(
        self,
        send: str | None = None,
        *,
        undo: str | Local | None = None,
        timeout: float | timedelta | None = None,
        name: str | None = None,
    ) -> Callable[[Callable[..., Any]], Step]:
        """Declare the next step.

        Args:
            send: the topic of the command (a participant step); without it the
                decorated ``async def (state, tx)`` is a local step.
            undo: an undo topic (the payload as for ``send``, or from
                ``@step.undo_payload``), or an ``async def (state, tx)`` run locally.
            timeout: how long to wait for the reply (participant steps; default:
                the saga's ``step_timeout``, 5 minutes); on expiry the step
                fails and the completed steps are undone, this one included
                (the participant may have acted late). Its undo command waits
                as long for its reply.
            name: the step's name (default: the function's name).

        Returns:
            A decorator returning the :class:`Step`.

        Raises:
            ConfigurationError: invalid topic, a sync local step, a timeout on a
                local step, or a duplicate step name.
        """
        if send is not None:
            names.check("topic", send)
        if isinstance(undo, str):
            names.check("topic", undo)
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if seconds is not None and seconds <= 0:
            raise errors.ConfigurationError(f"saga {self.name!r}: a step timeout must be positive")

        def decorate(func: Callable[..., Any]) -> Step:
            step_name = name or func.__name__
            if any(s.name == step_name for s in self.steps):
                raise errors.ConfigurationError(f"saga {self.name!r} already has a step {step_name!r}")
            if send is None and not inspect.iscoroutinefunction(func):
                raise errors.ConfigurationError(
                    f"local step {step_name!r} of saga {self.name!r} must be 'async def (state, tx)'"
                )
            if send is None and seconds is not None:
                raise errors.ConfigurationError(f"local step {step_name!r} runs in the transaction: no timeout")
            if undo is not None and not isinstance(undo, str) and not inspect.iscoroutinefunction(undo):
                raise errors.ConfigurationError(f"the undo of step {step_name!r} must be a topic or an async function")
            step = Step(
                name=step_name, index=len(self.steps), send=send,
                build=func if send is not None else None, local=func if send is None else None,
                undo_topic=undo if isinstance(undo, str) else None,
                undo_local=undo if undo is not None and not isinstance(undo, str) else None,
                timeout=seconds if seconds is not None else (self.step_timeout if send is not None else None),
            )  # fmt: skip
            self.steps.append(step)
            return step

        return decorate

    def instance_id(self, state: S, given: str | None) -> str:
        """The id of a new instance: ``given``, else derived with ``id=``.

        Raises:
            ConfigurationError: neither is available, or the id is not a non-empty string of at most 200 characters.
        """
        value = given if given is not None else (self.id_of(state) if self.id_of is not None else None)
        if value is None:
            raise errors.ConfigurationError(
                f"saga {self.name!r}: no instance id: give id=... to start(), or id= to Saga()"
            )
        return wire.check_instance(value)

    async def start(self, target: Publishes, state: S, *, id: str | None = None) -> str:  # noqa: A002
        """Start an instance; return its id.

        ``target`` is a handler's ``ctx`` or ``tx`` (the start is published with
        the handler's other messages, only if its attempt succeeds: in the same
        commit as its writes when it has a transaction) or a
        :class:`~conveyor.Publisher` (published now). A second start with the
        same id changes nothing.

        Raises:
            ConfigurationError: no valid instance id (see :meth:`instance_id`).
        """
        instance = self.instance_id(state, id)
        sent = target.publish(self.topic, state, key=instance, type=wire.START, extensions={wire.INSTANCE: instance})
        if inspect.isawaitable(sent):
            await sent
        return instance

    def start_event(self, state: S, *, id: str | None = None, source: str = "conveyor") -> envelope.Envelope:  # noqa: A002
        """The start event of a new instance, for ``Outbox.add(session, saga.topic, event)`` in any transaction.

        Raises:
            ConfigurationError: no valid instance id.
        """
        instance = self.instance_id(state, id)
        return envelope.create(wire.START, state, source=source, key=instance, extensions={wire.INSTANCE: instance})

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, steps={[s.name for s in self.steps]})"
