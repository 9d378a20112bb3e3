"""Saga messages on the wire: CloudEvents types and extension attributes.

Everything a saga receives comes on its topic ``sagas.<name>``, keyed by the
instance id (so one instance's signals are handled in order):

=========================  ==============================================================
type                       meaning, extensions
=========================  ==============================================================
``conveyor.saga.start``    start an instance; data = the initial state; ``sagaid``
``conveyor.saga.reply``    a participant's reply; ``sagaid``, ``sagatoken``,
                           ``sagaresult`` = ``ok`` | ``failed`` (data ``{"reason": ...}``)
``conveyor.saga.timer``    a timer it set; ``sagaid``, ``sagatoken``, ``sagatimer`` =
                           ``timeout`` | ``retry``
``conveyor.saga.control``  an operator's action; ``sagaid``, ``sagaaction`` = ``retry`` | ``abort``
=========================  ==============================================================

A command sent to a participant carries ``sagaid``, ``sagatoken`` and
``sagareply`` (the saga's topic); :meth:`conveyor.Context.reply` answers it. A
participant in another language replies by publishing a ``conveyor.saga.reply``
event to the ``sagareply`` topic with the same ``sagaid`` and ``sagatoken``.

Every value is checked here: a signal that cannot be read is rejected (dead-lettered with the reason).
"""

from __future__ import annotations

import re
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
        detail: the timer kind (``timeout``/``retry``) or the action (``retry``/``abort``).
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
        if timer not in ("timeout", "retry"):
            raise errors.Reject(f"{TIMER} with {TIMER_KIND}={timer!r}: expected timeout or retry")
        return Signal(kind, instance, token, detail=timer)
    result = ext.get(RESULT)
    if result not in ("ok", "failed"):
        raise errors.Reject(f"{REPLY} with {RESULT}={result!r}: expected ok or failed")
    return Signal(kind, instance, token, ok=result == "ok")


def command(instance: str, token: str, saga_topic: str) -> dict[str, str]:
    """The extensions of a command sent to a participant."""
    return {INSTANCE: instance, TOKEN: token, REPLY_TO: saga_topic}


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
