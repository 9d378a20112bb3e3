"""A saga instance as persisted, and what a transition returns (:mod:`conveyor.sagas.engine` moves them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Status(enum.StrEnum):
    """Where an instance is."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    """Parked: an undo kept failing; ``conveyor sagas retry`` resumes it."""

    @property
    def finished(self) -> bool:
        """Completed or compensated: no signal changes it any more."""
        return self in (Status.COMPLETED, Status.COMPENSATED)


@dataclass(frozen=True, slots=True)
class Instance:
    """A saga instance as persisted.

    Attributes:
        saga: the saga's name.
        id: the instance id (also the correlation id of its messages).
        state: the state, as JSON-compatible data.
        status: where it is.
        step: the index of the step running or being undone.
        waiting: the token of the reply or timer it waits for, if any (an
            unanswered undo keeps its command's token through the backoff and
            the re-send, and when it parks the saga, so a late reply is taken).
        sent: how many tokens it has issued (the next token is ``sent + 1``).
        undo_attempts: failed attempts of the current undo.
        error: what is wrong: why it is compensating, or why it is parked (an
            undo that kept failing); once compensated, why it compensated.
        cause: why it compensates (a step's failure or timeout, an abort),
            kept while ``error`` tells of failing undos.
        version: bumped by every saved transition.
        deadline: when the awaited reply times out or the next undo retry is due
            (aware UTC), if a timer is set; for operators (the timer itself is a
            delayed message).
        timer_id: the outbox message id of that timer (set by the runtime); the
            transition that moves the instance on deletes the row if unsent.
    """

    saga: str
    id: str
    state: dict[str, Any]
    status: Status = Status.RUNNING
    step: int = 0
    waiting: str | None = None
    sent: int = 0
    undo_attempts: int = 0
    error: str | None = None
    version: int = 0
    deadline: datetime | None = None
    cause: str | None = None
    timer_id: str | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """A command to publish: a step's (``kind="do"``) or its undo's (``"undo"``).

    ``resend`` is True for an unanswered undo sent again: same token, same
    message id (:func:`conveyor.sagas.wire.command_id`).
    """

    topic: str
    payload: Any
    token: str
    step: str
    kind: str
    resend: bool = False


@dataclass(frozen=True, slots=True)
class Timer:
    """A message to the saga itself after ``delay`` seconds.

    Kinds: a reply ``timeout``; an undo ``retry`` (a new try, after a failure);
    an undo ``resend`` (the unanswered command again, under its token).
    """

    token: str
    delay: float
    kind: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an instance's step log."""

    step: str
    event: str
    detail: str | None = None
    token: str | None = None


@dataclass(slots=True)
class Transition:
    """What one signal did: ``instance`` is ``None`` when nothing changed."""

    instance: Instance | None
    sends: list[Send] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    log: list[Entry] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether there is something to save."""
        return self.instance is not None
