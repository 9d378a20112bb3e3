"""Saga messages on the wire: CloudEvents types and extension attributes.

Everything a saga receives comes on its topic ``sagas.<name>``, keyed by the
instance id (so one instance's signals are handled in order):

=========================  ==============================================================
type                       meaning, extensions
=========================  ==============================================================
``conveyor.saga.start``    start an instance; data = the initial state; ``sagaid``
``conveyor.saga.reply``    a participant's reply; ``sagaid``, ``sagatoken``,
                           ``sagaresult`` = ``ok`` | ``failed`` (data ``{"reason": ...}``)
                           | ``deadlettered`` (sent by the participant's Conveyor worker
                           when it dead-letters the command, data ``{"reason": ...}``)
``conveyor.saga.timer``    a timer it set; ``sagaid``, ``sagatoken``, ``sagatimer`` =
                           ``timeout`` | ``retry`` | ``resend``
``conveyor.saga.control``  an operator's action; ``sagaid``, ``sagaaction`` = ``retry`` | ``abort``
=========================  ==============================================================

A command sent to a participant carries ``sagaid``, ``sagatoken`` and
``sagareply`` (the saga's topic); :meth:`conveyor.Context.reply` answers it.
Its message id is :func:`command_id`: an unanswered undo re-sent under the
same token is the same message, which the participant's inbox absorbs. A
participant in another language replies by publishing a ``conveyor.saga.reply``
event to the ``sagareply`` topic with the same ``sagaid`` and ``sagatoken``.

Every value is checked here: a signal that cannot be read is rejected (dead-lettered with the reason).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from conveyor import envelope, errors, names

START = "conveyor.saga.start"
REPLY = "conveyor.saga.reply"
TIMER = "conveyor.saga.timer"
CONTROL = "conveyor.saga.control"

INSTANCE = "sagaid"
TOKEN = "sagatoken"
REPLY_TO = "sagareply"
RESULT = "sagaresult"
TIMER_KIND = "sagatimer"
ACTION = "sagaaction"
DEAD_LETTERED = "deadlettered"
"""The ``sagaresult`` of the notice a participant's worker sends when it dead-letters a saga command."""
TIMER_KINDS = ("timeout", "retry", "resend")
_IDS = uuid.UUID("5b0f3c0e-8f61-4d7a-9d2e-2f6c1a7e4b93")

_TOKEN = re.compile(r"[0-9]{1,18}")
MAX_ID = 200


@dataclass(frozen=True, slots=True)
class Signal:
    """A message on a saga's topic, read and checked.

    Attributes:
        kind: ``start``, ``reply``, ``timer`` or ``control``.
        instance: the instance id.
        token: the token a reply or timer answers.
        ok: a reply's outcome.
        detail: the timer kind (``timeout``/``retry``/``resend``), the action
            (``retry``/``abort``), or ``deadlettered`` for a reply that tells the
            command was dead-lettered.
    """

    kind: str
    instance: str
    token: str | None = None
    ok: bool = True
    detail: str | None = None


def check_instance(value: object) -> str:
    """``value`` if it is a valid instance id (1-200 printable characters).

    Raises:
        ConfigurationError: it is not.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID or not value.isprintable():
        raise errors.ConfigurationError(f"invalid saga instance id {value!r}: use 1-{MAX_ID} printable characters")
    return value


def signal(message: envelope.Envelope) -> Signal:
    """Read a message of a saga's topic.

    Raises:
        Reject: an unknown type, a missing or invalid extension; the message says which.
    """
    ext = message.extensions
    kinds = {START: "start", REPLY: "reply", TIMER: "timer", CONTROL: "control"}
    kind = kinds.get(message.type)
    if kind is None:
        raise errors.Reject(f"not a saga signal: type {message.type!r} (expected one of {', '.join(kinds)})")
    try:
        instance = check_instance(ext.get(INSTANCE))
    except errors.ConfigurationError as exc:
        raise errors.Reject(f"{message.type} without a valid {INSTANCE}: {exc}") from None
    if kind == "start":
        return Signal(kind, instance)
    if kind == "control":
        action = ext.get(ACTION)
        if action not in ("retry", "abort"):
            raise errors.Reject(f"{CONTROL} with {ACTION}={action!r}: expected retry or abort")
        return Signal(kind, instance, detail=action)
    token = ext.get(TOKEN)
    if token is None or not _TOKEN.fullmatch(token):
        raise errors.Reject(f"{message.type} with {TOKEN}={token!r}: expected the token of the command it answers")
    if kind == "timer":
        timer = ext.get(TIMER_KIND)
        if timer not in TIMER_KINDS:
            raise errors.Reject(f"{TIMER} with {TIMER_KIND}={timer!r}: expected {', '.join(TIMER_KINDS)}")
        return Signal(kind, instance, token, detail=timer)
    result = ext.get(RESULT)
    if result not in ("ok", "failed", DEAD_LETTERED):
        raise errors.Reject(f"{REPLY} with {RESULT}={result!r}: expected ok, failed or {DEAD_LETTERED}")
    return Signal(kind, instance, token, ok=result == "ok", detail=DEAD_LETTERED if result == DEAD_LETTERED else None)


def command(instance: str, token: str, saga_topic: str) -> dict[str, str]:
    """The extensions of a command sent to a participant."""
    return {INSTANCE: instance, TOKEN: token, REPLY_TO: saga_topic}


def command_id(saga: str, instance: str, step: str, kind: str, token: str) -> str:
    """The message id of a saga's command: the same for the same saga, instance, step, ``do``/``undo`` and token.

    A command sent again under its token (an unanswered undo) is therefore the
    same message: a participant whose handler uses the inbox handles it once.
    """
    return str(uuid.uuid5(_IDS, f"{saga}\n{instance}\n{step}\n{kind}\n{token}"))


def reply_to(message: envelope.Envelope, *, failed: bool) -> tuple[str, dict[str, str]]:
    """Where to send the reply to a command, and its extensions.

    Raises:
        ConfigurationError: the message is not a saga command (or its saga attributes are invalid).
    """
    ext = message.extensions
    topic, instance, token = ext.get(REPLY_TO), ext.get(INSTANCE), ext.get(TOKEN)
    if topic is None or instance is None or token is None:
        raise errors.ConfigurationError(
            f"ctx.reply(): message {message.id} ({message.type}) is not a saga command: it has no "
            f"{REPLY_TO}/{INSTANCE}/{TOKEN} extensions. Only handlers of a saga step's command can reply"
        )
    names.check("saga reply topic", topic)
    check_instance(instance)
    if not _TOKEN.fullmatch(token):
        raise errors.ConfigurationError(f"ctx.reply(): invalid {TOKEN} {token!r} on message {message.id}")
    return topic, {INSTANCE: instance, TOKEN: token, RESULT: "failed" if failed else "ok"}
