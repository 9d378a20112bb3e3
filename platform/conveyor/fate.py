"""A failure's fate, decided in one place: a pure function from what happened to what happens next.

:func:`decide` turns (the phase, the error, the message's tries so far, the
limits, the health of the dependency the error blames) into one
:data:`Outcome`; the callers (single and batch handlers, the relay, saga
transitions, scheduler jobs) only carry it out. Nothing else classifies
errors, and nothing here reads an error's text: only its class.

The classification (the README's Guarantees table says the same):

* **Our infrastructure's fault** (:func:`blamed` names the dependency):
  :class:`~conveyor.errors.StoreUnavailable` (a connection refused, reset or
  lost; a pool that cannot hand out one; SQLSTATE classes 08, 53, 57P), a
  :class:`~conveyor.errors.TransientTransportError` (a broker that does not
  answer), and a timeout or ``OSError`` while Conveyor itself talks to the
  database (the inbox claim, the commit) or the broker (publishing, dead
  letters). Such a failure **holds** the message (no attempt spent, run
  again in place) while the dependency fails its probe. If the probe passes,
  the message is run once more (the outage may have ended meanwhile); failing
  the same way again, with the dependency answering, is the message's fault.
  Holds are bounded: after ``hold_limit`` seconds held, attempts count again.
* **Conflicts**: :class:`~conveyor.errors.ConcurrencyConflict` (serialization
  failures, deadlocks, an expected version that moved) are re-run at once,
  ``conflict_limit`` times without spending an attempt, then count.
* **The message's or the handler's fault**: everything else:
  :class:`~conveyor.errors.StatementError` (constraint violations, data and
  syntax errors, the handler's own statement timeouts), a handler exception,
  the handler's own deadline (``TimeoutError``), ``Retry``. Retried with
  backoff, dead-lettered once ``max_attempts`` are spent.
* **Poison**: ``Reject`` and :class:`~conveyor.errors.InvalidMessage`: dead
  letters at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from conveyor import errors, retry

HOLD_LIMIT = 900.0
"""Default seconds one message may be held through outages before its attempts count again."""
CONFLICT_LIMIT = 5
"""Default re-runs of a conflicting attempt before conflicts spend attempts."""
HOLD_PAUSES = (0.5, 30.0)
"""First and longest pause (seconds) between tries of a held message; it doubles in between."""
CONFLICT_PAUSE = 0.05
"""Pause before re-running a conflicting attempt, times the conflicts so far."""
RECHECK_PAUSE = 0.2
"""Pause before the one re-run of a message whose dependency passed its probe after failing it."""


class Phase(enum.StrEnum):
    """Where a failure happened."""

    HANDLER = "handler"
    """The handler's own code, its statements included."""
    COMMIT = "commit"
    """Conveyor's own database work around the handler: the inbox claim, the outbox rows, the commit."""
    PUBLISH = "publish"
    """Conveyor publishing to the broker: a handler's messages without a database, a dead letter, an outbox row."""


class Dependency(enum.StrEnum):
    """The infrastructure an outage is blamed on."""

    DATABASE = "database"
    BROKER = "broker"


@dataclass(frozen=True, slots=True)
class Retry:
    """Spend an attempt: deliver the message again after ``delay`` seconds (a nack with a delay)."""

    delay: float
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Send the message to its dead-letter topic with the reason, then ack it."""

    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Not the message's fault: run it again in place after ``pause`` seconds, spending no attempt.

    Attributes:
        dependency: the dependency blamed, or None for a conflict.
        pause: seconds to wait first.
        reason: what happened, for the log.
        recheck: the dependency passed its probe: this is the one re-run that
            tells an outage that has just ended from the message's own failure.
    """

    dependency: Dependency | None
    pause: float
    reason: str
    recheck: bool = False


Outcome = Retry | DeadLetter | Hold
"""What to do with a message after a failure (success is simply an ack)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a decision applies.

    Attributes:
        retry: the handler's retry policy (``max_attempts``, backoff).
        hold_limit: seconds one message may be held through outages in all;
            after that its failures spend attempts (``CONVEYOR_HOLD_LIMIT``).
        conflict_limit: conflicts re-run without spending an attempt.
    """

    retry: retry.RetryPolicy
    hold_limit: float = HOLD_LIMIT
    conflict_limit: int = CONFLICT_LIMIT


@dataclass(frozen=True, slots=True)
class Tries:
    """What one delivery of a message has been through in this process.

    Attributes:
        attempt: the delivery's attempt number (1-based, counted by the broker or our retry header).
        held_for: seconds it has been held so far.
        holds: holds so far (sets the next pause).
        rechecked: it was run once more after its dependency passed the probe.
        conflicts: conflicts re-run so far.
    """

    attempt: int
    held_for: float = 0.0
    holds: int = 0
    rechecked: bool = False
    conflicts: int = 0


def blamed(phase: Phase, error: BaseException) -> Dependency | None:
    """The dependency whose outage ``error`` is, or None if it is no outage of ours.

    In the handler's own code an ``OSError`` or a timeout is the handler's
    (its HTTP call failed, its deadline struck); only our error tree's outage
    classes blame a dependency there. In Conveyor's own phases a timeout or an
    ``OSError`` blames the dependency that phase talks to.
    """
    if isinstance(error, errors.StoreUnavailable):
        return Dependency.DATABASE
    if isinstance(error, errors.TransientTransportError):
        return Dependency.BROKER
    if phase is Phase.HANDLER or not isinstance(error, TimeoutError | OSError):
        return None
    return Dependency.DATABASE if phase is Phase.COMMIT else Dependency.BROKER


def not_the_callers_fault(error: BaseException) -> bool:
    """Whether ``error``, raised by user code running inside a Conveyor transaction, is our infrastructure's.

    An outage (:func:`blamed` in the handler's phase) or a store failure that
    is no refused statement (a conflict, an unknown store error): the whole
    transition is retried through :func:`decide`. A saga's local step uses it
    to tell these from the step's own failure (its exception, a refused
    statement), which compensates instead.
    """
    if blamed(Phase.HANDLER, error) is not None:
        return True
    return isinstance(error, errors.StoreError) and not isinstance(error, errors.StatementError)


def kind_of(error: BaseException) -> str:
    """The error type recorded in logs and dead-letter headers."""
    if isinstance(error, errors.Retry):
        return "Retry"
    if isinstance(error, errors.Reject):
        return "Rejected"
    if isinstance(error, errors.InvalidMessage):
        return "InvalidMessage"
    return type(error).__name__


def reason_of(error: BaseException) -> str:
    """The error's text for logs and dead-letter headers."""
    if isinstance(error, errors.Retry | errors.Reject):
        return error.reason
    return str(error) or type(error).__name__


def decide(phase: Phase, error: BaseException, tries: Tries, limits: Limits, healthy: bool | None) -> Outcome:
    """The fate of a message whose attempt failed with ``error``.

    Args:
        phase: where it failed.
        error: what was raised.
        tries: what this delivery has been through.
        limits: the bounds.
        healthy: the probe of the dependency :func:`blamed` names: True (it
            answers), False (it does not), None (there is no probe, or no
            dependency is blamed). A hold needs False, or True once (the
            recheck); without a probe nothing proves an outage.

    Returns:
        :class:`Hold`, :class:`Retry` or :class:`DeadLetter`.
    """
    dependency = blamed(phase, error)
    if dependency is not None and tries.held_for < limits.hold_limit:
        if healthy is False:
            pause = min(HOLD_PAUSES[0] * 2 ** min(tries.holds, 16), HOLD_PAUSES[1])
            return Hold(dependency, pause, f"the {dependency} is unavailable: {reason_of(error)}")
        if healthy is True and not tries.rechecked:
            reason = f"the {dependency} answers its probe after {reason_of(error)}; trying once more"
            return Hold(dependency, RECHECK_PAUSE, reason, recheck=True)
    if isinstance(error, errors.ConcurrencyConflict) and tries.conflicts < limits.conflict_limit:
        return Hold(None, CONFLICT_PAUSE * (tries.conflicts + 1), f"conflict: {reason_of(error)}")
    return fault(error, tries.attempt, limits.retry)


def fault(error: BaseException, attempt: int, policy: retry.RetryPolicy) -> Retry | DeadLetter:
    """The message's own failure: a retry after the backoff, a dead letter once attempts are spent."""
    kind, reason = kind_of(error), reason_of(error)
    if policy.exhausted(attempt) or isinstance(error, errors.Reject | errors.InvalidMessage):
        return DeadLetter(kind, reason)
    if isinstance(error, errors.Retry) and error.delay is not None:
        return Retry(error.delay, kind, reason)
    return Retry(policy.delay(attempt), kind, reason)
