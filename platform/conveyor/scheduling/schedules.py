"""Declaring cron jobs (``@cron``, ``@every``) and planning which fires to run.

A schedule fires at instants computed by :mod:`conveyor.scheduling.triggers`.
Each fire is claimed once, across every scheduler replica, by the scheduler
runtime; the job itself then runs on a worker like any handler, from a message
on the topic ``schedules.<name>`` (so it gets retries, dead letters and traces).

Misfires (fires that passed while no scheduler ran, older than ``grace``):

* ``skip``: none of them runs; the latest is recorded as skipped;
* ``coalesce``: one run, for the latest missed fire;
* ``all``: every missed fire runs, at most ``max_catchup`` of the latest.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from apscheduler.triggers.base import BaseTrigger

from conveyor import errors, names, retry
from conveyor.scheduling import triggers

F = TypeVar("F", bound=Callable[..., Any])
Misfire = Literal["skip", "coalesce", "all"]
Overlap = Literal["skip", "allow"]
ATTRIBUTE = "__conveyor_schedule__"
TOPIC_PREFIX = "schedules."
DEFAULT_GRACE = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A declared cron job.

    Attributes:
        name: stable dotted name; keys the fire claims and the job's topic.
        func: the job function, taking ``(ctx)`` or nothing.
        trigger: the APScheduler trigger computing fire times.
        expression: the cron expression or interval, for display.
        tz: time zone of the expression.
        misfire: ``skip``, ``coalesce`` or ``all`` (see the module docs).
        max_catchup: most missed fires run under ``all``.
        jitter: seconds of random delay added to each run (the fire's identity
            stays the un-jittered time).
        overlap: ``skip`` does not start a fire while the previous run of the
            same schedule is still running; ``allow`` does.
        max_attempts: deliveries of the job message before it is dead-lettered.
        timeout: seconds one run may take.
        publishes: the topics the job publishes to, each with its payload type
            or ``None`` (for the AsyncAPI document only).
    """

    name: str
    func: Callable[..., Any] = field(repr=False)
    trigger: BaseTrigger = field(repr=False)
    expression: str
    tz: str
    misfire: Misfire
    max_catchup: int
    jitter: float | None
    overlap: Overlap
    max_attempts: int
    timeout: float | None
    publishes: tuple[tuple[str, Any], ...] = ()

    @property
    def topic(self) -> str:
        """The topic carrying this schedule's job messages."""
        return TOPIC_PREFIX + self.name

    @property
    def where(self) -> str:
        """``module.function``, for messages."""
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def next_fires(self, after: datetime, count: int) -> list[datetime]:
        """The next ``count`` fire times after ``after`` (UTC)."""
        fires = []
        for fire in triggers.fire_times(self.trigger, after):
            fires.append(fire)
            if len(fires) == count:
                break
        return fires


def cron(
    expression: str,
    *,
    name: str,
    tz: str = "UTC",
    misfire: Misfire = "coalesce",
    max_catchup: int = 100,
    jitter: timedelta | float | None = None,
    overlap: Overlap = "skip",
    max_attempts: int = 3,
    timeout: timedelta | float | None = 300.0,
    publishes: Iterable[str] | Mapping[str, Any] = (),
) -> Callable[[F], F]:
    """Declare a cron job: ``@cron("*/5 * * * *", name="reports.refresh", tz="Europe/Berlin")``.

    The expression is a standard crontab line (minute hour day month weekday,
    0 or 7 = Sunday), optionally with a leading seconds field, or a macro
    (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``).
    ``publishes`` names the topics the job publishes to, as on
    :func:`conveyor.on`, for the AsyncAPI document.

    Raises:
        ConfigurationError: invalid expression, time zone, name or option,
            naming the module and function.
    """
    return _declare(lambda: triggers.cron_trigger(expression, tz), expression, tz, locals())


def every(
    interval: timedelta,
    *,
    name: str,
    start: datetime | None = None,
    misfire: Misfire = "coalesce",
    max_catchup: int = 100,
    jitter: timedelta | float | None = None,
    overlap: Overlap = "skip",
    max_attempts: int = 3,
    timeout: timedelta | float | None = 300.0,
    publishes: Iterable[str] | Mapping[str, Any] = (),
) -> Callable[[F], F]:
    """Declare a job run every ``interval``, anchored to ``start`` (default 2000-01-01T00:00Z).

    ``publishes`` names the topics the job publishes to, as on :func:`conveyor.on`.

    Raises:
        ConfigurationError: non-positive interval, invalid name or option.
    """
    return _declare(lambda: triggers.interval_trigger(interval, start), f"every {interval}", "UTC", locals())


def _declare(
    make_trigger: Callable[[], BaseTrigger], expression: str, tz: str, options: dict[str, Any]
) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        where = f"{func.__module__}.{func.__qualname__}"
        try:
            schedule = Schedule(
                name=names.check("schedule name", options["name"]),
                func=func,
                trigger=make_trigger(),
                expression=expression,
                tz=tz,
                misfire=_choice("misfire", options["misfire"], ("skip", "coalesce", "all")),
                max_catchup=_positive("max_catchup", options["max_catchup"]),
                jitter=_non_negative("jitter", retry.seconds(options["jitter"])),
                overlap=_choice("overlap", options["overlap"], ("skip", "allow")),
                max_attempts=_positive("max_attempts", options["max_attempts"]),
                timeout=retry.seconds(options["timeout"]),
                publishes=names.published(options["publishes"]),
            )
            _check_signature(func)
        except errors.ConfigurationError as exc:
            raise errors.ConfigurationError(f"schedule {where}: {exc}") from None
        setattr(func, ATTRIBUTE, schedule)
        return func

    return decorate


def _choice(option: str, value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise errors.ConfigurationError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _positive(option: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise errors.ConfigurationError(f"{option} must be a positive integer, got {value!r}")
    return value


def _non_negative(option: str, value: float | None) -> float | None:
    if value is not None and value < 0:
        raise errors.ConfigurationError(f"{option} must not be negative, got {value!r}")
    return value


def _check_signature(func: Callable[..., Any]) -> None:
    params = [p for p in inspect.signature(func).parameters.values() if p.default is p.empty]
    if len(params) > 1:
        raise errors.ConfigurationError(f"a scheduled job takes (ctx) or nothing, not {len(params)} parameters")


@dataclass(frozen=True, slots=True)
class Fire:
    """One planned fire: its un-jittered UTC time and whether the job runs."""

    at: datetime
    run: bool


def plan(schedule: Schedule, last: datetime | None, now: datetime, grace: timedelta = DEFAULT_GRACE) -> list[Fire]:
    """Which fires to claim now.

    Args:
        schedule: the schedule.
        last: the latest fire already claimed by any replica (``None``: never fired).
        now: the current time (the database's clock).
        grace: a fire found at most this late is on time; older ones are misfires.

    Returns:
        Fires in time order: misfires per the schedule's policy, then on-time fires.
    """
    on_time_after = now - grace if last is None else max(last, now - grace)
    on_time = [Fire(at, True) for at in triggers.fire_times(schedule.trigger, on_time_after, now)]
    if last is None or last >= now - grace:
        return on_time
    limit = schedule.max_catchup if schedule.misfire == "all" else 1
    missed = latest_fires(schedule.trigger, after=last, until=now - grace, limit=limit)
    if not missed:
        return on_time
    if schedule.misfire == "all":
        return [Fire(at, True) for at in missed] + on_time
    return [Fire(missed[-1], schedule.misfire == "coalesce"), *on_time]


def latest_fires(trigger: BaseTrigger, after: datetime, until: datetime, limit: int) -> list[datetime]:
    """The latest ``limit`` fires in ``(after, until]``, oldest first, without walking the whole gap."""
    window = timedelta(minutes=1)
    while True:
        start = max(after, until - window)
        fires = list(triggers.fire_times(trigger, start, until))
        if len(fires) >= limit or start <= after:
            return fires[-limit:]
        window *= 4
