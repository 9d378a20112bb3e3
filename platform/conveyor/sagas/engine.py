"""How a saga instance moves: each signal (start, reply, timer, operator action) is one transition.

A transition reads the instance, decides, and returns what to persist and send:
the new instance (its version one higher), the commands and timers to publish,
and the entries for the step log. The caller runs it inside one database
transaction with the inbox row of the message that caused it and the outbox
rows of what it sends, and saves the instance only if its version did not
move (optimistic concurrency): a transition is applied once or not at all.

Replies and timers carry the *token* of the command or timer they answer; an
instance waits for one token at a time, so a duplicate, stale, late or
out-of-order signal finds another token (or a finished instance) and changes
nothing beyond a log entry.

Failure rules:

* a step's failure reply: the completed steps before it are undone;
* a step's timeout, its command dead-lettered by the participant's worker, or
  an operator's abort while it waits: the completed steps *and this one* are
  undone (the participant may have acted late, or act when the dead letter is
  replayed);
* a local step that raises, a database refusing its statement included (a
  :class:`~conveyor.errors.StatementError`: a CHECK or unique key used as a
  business rule): the steps before it are undone (its own writes were rolled
  back to a savepoint by the caller);
* an undo that fails (a failure reply, a raising local undo) is tried again
  with doubling backoff as a new command (a new token: the participant handled
  the first one); an undo that gets no reply in time is *re-sent*: the same
  command, token and message id, so a participant's inbox absorbs it if the
  first arrived, and a late reply to it is taken while the saga waits for the
  backoff, for the re-sent command, or is parked. A dead-lettered undo changes
  nothing until its timeout re-sends it. After ``max_undo_attempts`` failures
  or timeouts the saga is parked as ``failed`` until an operator retries it.

Other errors of the store raised by a local function (an outage, a concurrency
conflict: any :class:`~conveyor.errors.StoreError` but a ``StatementError``)
are not the step's fault: they propagate, the transition is not saved, and the
message that caused it is retried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic

from conveyor import errors, fate
from conveyor.sagas import definition
from conveyor.sagas.instances import Entry, Instance, Send, Status, Timer, Transition

__all__ = [
    "DEFAULT_STEP_TIMEOUT", "Entry", "Instance", "RunLocal", "Send", "Status", "Timer", "Transition",
    "abort", "reply", "resume", "start", "timer",
]  # fmt: skip

DEFAULT_STEP_TIMEOUT = definition.DEFAULT_STEP_TIMEOUT
UNDO_BACKOFF_CAP = 600.0


RunLocal = Callable[[definition.Local, pydantic.BaseModel], Awaitable[None]]
"""Runs a local step or undo in the saga's transaction, rolling its own writes back if it raises."""


class _Run:
    def __init__(self, saga: definition.Saga[Any], instance: Instance, run_local: RunLocal) -> None:
        self.saga = saga
        self.i = instance
        self.state = saga.state.model_validate(instance.state)
        self.run_local = run_local
        self.out = Transition(None)

    def done(self) -> Transition:
        state = self.state.model_dump(mode="json")
        timers = [t for t in self.out.timers if t.token == self.i.waiting]
        deadline = datetime.now(UTC) + timedelta(seconds=timers[-1].delay) if timers else None
        self.out.instance = dataclasses.replace(self.i, state=state, version=self.i.version + 1, deadline=deadline)
        return self.out

    def _set(self, **changes: Any) -> None:
        self.i = dataclasses.replace(self.i, **changes)

    def _token(self) -> str:
        self._set(sent=self.i.sent + 1)
        return str(self.i.sent)

    def _log(
        self, step: definition.Step | None, event: str, detail: str | None = None, token: str | None = None
    ) -> None:
        self.out.log.append(Entry(step.name if step else "", event, detail, token))

    async def advance(self) -> None:
        steps = self.saga.steps
        while self.i.status is Status.RUNNING:
            if self.i.step >= len(steps):
                self._set(status=Status.COMPLETED, waiting=None)
                self._log(None, "completed")
                return
            step = steps[self.i.step]
            if step.local is None:
                assert step.send is not None and step.build is not None
                token = self._token()
                self.out.sends.append(Send(step.send, step.build(self.state), token, step.name, "do"))
                self.out.timers.append(Timer(token, _timeout(self.saga, step), "timeout"))
                self._set(waiting=token)
                self._log(step, "sent", step.send, token)
                return
            try:
                await self.run_local(step.local, self.state)
            except Exception as exc:  # the step's own failure: undo what came before
                if fate.not_the_callers_fault(exc):
                    raise
                self._log(step, "failed", _describe(exc))
                await self.compensate(self.i.step - 1, f"step {step.name!r} failed: {_describe(exc)}")
                return
            self._log(step, "done")
            self._set(step=self.i.step + 1)

    async def compensate(self, last: int, error: str) -> None:
        self._set(status=Status.COMPENSATING, step=last, waiting=None, undo_attempts=0, error=error, cause=error)
        self._log(None, "compensating", error)
        await self.undo_next()

    async def undo_next(self) -> None:
        while self.i.step >= 0:
            step = self.saga.steps[self.i.step]
            if not step.has_undo:
                self._set(step=self.i.step - 1)
                continue
            if step.undo_local is not None:
                try:
                    await self.run_local(step.undo_local, self.state)
                except Exception as exc:
                    if fate.not_the_callers_fault(exc):
                        raise
                    self.undo_failed(step, _describe(exc))
                    return
                self._log(step, "undone")
                self._set(step=self.i.step - 1, undo_attempts=0)
                continue
            self.send_undo(step, self._token())
            return
        self._set(status=Status.COMPENSATED, waiting=None, error=self.i.cause or self.i.error)
        self._log(None, "compensated")

    def send_undo(self, step: definition.Step, token: str, *, resend: bool = False) -> None:
        assert step.undo_topic is not None
        build = step.undo_build or step.build
        assert build is not None
        self.out.sends.append(Send(step.undo_topic, build(self.state), token, step.name, "undo", resend))
        self.out.timers.append(Timer(token, _timeout(self.saga, step), "timeout"))
        self._set(waiting=token)
        self._log(step, "undo re-sent" if resend else "undo sent", step.undo_topic, token)

    def undo_unanswered(self, step: definition.Step, token: str, error: str) -> None:
        """No reply to the undo command of ``token``: re-send it after the backoff, still waiting for its reply."""
        attempts = self.i.undo_attempts + 1
        self._set(undo_attempts=attempts)
        if attempts >= self.saga.max_undo_attempts:
            reason = f"the undo of step {step.name!r} failed {attempts} times; last error: {error}"
            self._set(status=Status.FAILED, error=reason)  # still waiting: a late reply resumes it
            self._log(step, "parked", reason, token)
            return
        delay = self._backoff(attempts)
        self.out.timers.append(Timer(token, delay, "resend"))
        self._log(step, "undo failed", f"{error}; re-sent in {delay:g}s (attempt {attempts + 1})", token)

    def _backoff(self, attempts: int) -> float:
        return float(min(self.saga.undo_backoff * 2 ** (attempts - 1), UNDO_BACKOFF_CAP))

    def undo_failed(self, step: definition.Step, error: str) -> None:
        attempts = self.i.undo_attempts + 1
        self._set(undo_attempts=attempts, waiting=None)
        if attempts >= self.saga.max_undo_attempts:
            reason = f"the undo of step {step.name!r} failed {attempts} times; last error: {error}"
            self._set(status=Status.FAILED, error=reason)
            self._log(step, "parked", reason)
            return
        delay = self._backoff(attempts)
        token = self._token()
        self.out.timers.append(Timer(token, delay, "retry"))
        self._set(waiting=token)
        self._log(step, "undo failed", f"{error}; retry {attempts + 1} in {delay:g}s", token)


def _timeout(saga: definition.Saga[Any], step: definition.Step) -> float:
    """Seconds a step's command (or its undo's) waits for its reply."""
    return step.timeout if step.timeout is not None else saga.step_timeout


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ignored(instance: Instance, what: str, token: str | None) -> Transition:
    reason = f"ignored {what}: the instance is {instance.status.value}, waiting for {instance.waiting or 'nothing'}"
    return Transition(None, log=[Entry("", "ignored", reason, token)])


async def start(
    saga: definition.Saga[Any], instance_id: str, state: pydantic.BaseModel, run_local: RunLocal
) -> Transition:
    """A new instance, run until its first wait (or its end)."""
    run = _Run(saga, Instance(saga.name, instance_id, state.model_dump(mode="json")), run_local)
    run._log(None, "started")
    await run.advance()
    return run.done()


async def reply(
    saga: definition.Saga[Any],
    instance: Instance,
    token: str,
    ok: bool,
    payload: Any,
    run_local: RunLocal,
    *,
    dead_lettered: bool = False,
) -> Transition:
    """A participant's reply to the command that carried ``token``.

    ``dead_lettered``: the participant's worker dead-lettered the command (a
    failure it could not reply to); the step fails as on a timeout.
    """
    what = "a dead-letter notice" if dead_lettered else "a success reply" if ok else "a failure reply"
    if instance.waiting != token or instance.status.finished or (instance.status is Status.FAILED and dead_lettered):
        return _ignored(instance, what, token)
    run = _Run(saga, instance, run_local)
    step = saga.steps[instance.step]
    if dead_lettered:
        if instance.status is Status.COMPENSATING:  # its timeout re-sends it (same id): nothing to do until then
            return Transition(None, log=[Entry(step.name, "undo dead-lettered", _reason(payload), token)])
        run._set(waiting=None)
        run._log(step, "dead-lettered", _reason(payload), token)
        await run.compensate(instance.step, f"the command of step {step.name!r} was dead-lettered: {_reason(payload)}")
        return run.done()
    run._set(waiting=None)
    if instance.status is Status.FAILED:  # parked on an unanswered undo: its late reply
        if ok:
            run._set(status=Status.COMPENSATING)
        else:
            run._set(error=f"the undo of step {step.name!r} failed: {_reason(payload)}")
            run._log(step, "undo failed", f"{_reason(payload)}; still parked", token)
            return run.done()
    if instance.status is Status.RUNNING:
        if ok:
            if step.on_reply is not None:
                step.on_reply(run.state, payload)
            run._log(step, "replied", None, token)
            run._set(step=instance.step + 1)
            await run.advance()
        else:
            run._log(step, "failed", _reason(payload), token)
            await run.compensate(instance.step - 1, f"step {step.name!r} failed: {_reason(payload)}")
    elif ok:
        run._log(step, "undone", None, token)
        run._set(step=instance.step - 1, undo_attempts=0)
        await run.undo_next()
    else:
        run.undo_failed(step, _reason(payload))
    return run.done()


async def timer(
    saga: definition.Saga[Any], instance: Instance, token: str, kind: str, run_local: RunLocal
) -> Transition:
    """A timer the instance set: a reply ``timeout``, an undo ``retry`` (a new try) or ``resend`` (the same command)."""
    compensating = instance.status is Status.COMPENSATING
    if instance.waiting != token or not ((instance.status is Status.RUNNING and kind == "timeout") or compensating):
        return _ignored(instance, f"a {kind} timer", token)
    run = _Run(saga, instance, run_local)
    step = saga.steps[instance.step]
    if kind == "retry":
        run._set(waiting=None)
        await run.undo_next()
    elif kind == "resend":
        run.send_undo(step, token, resend=True)
    elif instance.status is Status.RUNNING:
        run._set(waiting=None)
        reason = f"step {step.name!r} got no reply within {_timeout(saga, step):g}s"
        run._log(step, "timed out", reason, token)
        await run.compensate(instance.step, reason)
    else:
        run.undo_unanswered(step, token, f"no reply to the undo within {_timeout(saga, step):g}s")
    return run.done()


async def resume(saga: definition.Saga[Any], instance: Instance, run_local: RunLocal) -> Transition:
    """An operator's retry of a parked (``failed``) instance: its undos run again from where they stopped.

    Raises:
        ConfigurationError: the instance is not parked.
    """
    if instance.status is not Status.FAILED:
        raise errors.ConfigurationError(f"saga {saga.name} {instance.id} is {instance.status.value}, not failed")
    run = _Run(saga, instance, run_local)
    run._set(status=Status.COMPENSATING, undo_attempts=0)
    run._log(None, "retried", "by an operator")
    if instance.waiting is not None:  # parked on an unanswered undo: the same command again
        run.send_undo(saga.steps[instance.step], instance.waiting, resend=True)
    else:
        await run.undo_next()
    return run.done()


async def abort(saga: definition.Saga[Any], instance: Instance, run_local: RunLocal) -> Transition:
    """An operator's abort of a running instance: what it did is undone, the waiting step included.

    Raises:
        ConfigurationError: the instance is not running.
    """
    if instance.status is not Status.RUNNING:
        raise errors.ConfigurationError(f"saga {saga.name} {instance.id} is {instance.status.value}, not running")
    run = _Run(saga, instance, run_local)
    last = instance.step if instance.waiting is not None else instance.step - 1
    await run.compensate(last, "aborted by an operator")
    return run.done()


def _reason(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("reason"), str):
        return str(payload["reason"])[:1000]
    return repr(payload)[:1000]
