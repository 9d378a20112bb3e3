"""Fire times from APScheduler 3.11 triggers (the only part of APScheduler Conveyor uses).

APScheduler's own scheduler is never run: in several processes it would fire
every job in each of them. Its triggers only compute *when*; claiming each fire
exactly once is the scheduler's job (:mod:`conveyor.runtime.scheduler`).

Rules, fixed here and tested:

* Standard crontab day-of-week numbers are used (0 and 7 = Sunday, 1 = Monday);
  APScheduler 3.x reads 0 as Monday, so numbers are translated to day names.
  A sixth leading field, if present, is seconds.
* Fire times are UTC instants. A wall-clock time that happens twice when
  clocks go back fires twice (two instants); a wall-clock time skipped when
  clocks go forward fires once, at the instant the clock skipped to.
* Intervals are anchored to a fixed start (default 2000-01-01T00:00Z), so
  every replica computes the same fire times.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from conveyor import errors

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # standard cron numbering
_DOW_TOKEN = re.compile(r"^(\*|[a-z0-9]+)(?:-([a-z0-9]+))?(?:/(\d+))?$")


def zone(name: str) -> ZoneInfo:
    """The time zone named ``name`` (IANA).

    Raises:
        ConfigurationError: unknown time zone.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise errors.ConfigurationError(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin'"
        ) from exc


def _day_number(token: str) -> int:
    if token.isdigit():
        number = int(token)
        if number > 7:
            raise ValueError(f"day of week {number} is out of range 0-7")
        return number % 7
    if token[:3] in _DAY_NAMES:
        return _DAY_NAMES.index(token[:3])
    raise ValueError(f"unknown day of week {token!r}")


def translate_day_of_week(field: str) -> str:
    """A standard crontab day-of-week field as APScheduler day names (``1-5`` -> ``mon,tue,...``)."""
    days: set[int] = set()
    for part in field.lower().split(","):
        match = _DOW_TOKEN.match(part)
        if not match:
            raise ValueError(f"invalid day-of-week part {part!r}")
        start, end, step = match.group(1), match.group(2), int(match.group(3) or 1)
        if start == "*":
            first, last = 0, 6
        else:
            first = _day_number(start)
            last = (7 if end == "7" else _day_number(end)) if end else (6 if match.group(3) else first)
        if last < first:
            raise ValueError(f"day-of-week range {part!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def cron_trigger(expression: str, tz: str) -> CronTrigger:
    """An APScheduler cron trigger for a crontab expression (5 fields, or 6 with seconds first).

    Raises:
        ConfigurationError: invalid expression or time zone; the message says which field.
    """
    fields = _MACROS.get(expression.strip().lower(), expression).split()
    if len(fields) not in (5, 6):
        raise errors.ConfigurationError(
            f"invalid cron expression {expression!r}: expected 5 fields (minute hour day month weekday), "
            "6 with seconds first, or a macro such as @daily"
        )
    second = fields[0] if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields[-5:]
    try:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=translate_day_of_week(weekday),
            timezone=zone(tz),
        )
    except errors.ConfigurationError:
        raise
    except ValueError as exc:
        raise errors.ConfigurationError(f"invalid cron expression {expression!r}: {exc}") from exc


def interval_trigger(every: timedelta, start: datetime | None = None) -> IntervalTrigger:
    """An APScheduler interval trigger anchored to ``start`` (default 2000-01-01T00:00Z).

    Raises:
        ConfigurationError: a non-positive interval or a naive start time.
    """
    if every <= timedelta(0):
        raise errors.ConfigurationError(f"interval must be positive, got {every}")
    anchor = start or EPOCH
    if anchor.tzinfo is None:
        raise errors.ConfigurationError("interval start must be an aware datetime")
    return IntervalTrigger(seconds=every.total_seconds(), start_date=anchor, timezone=UTC)


def fire_times(trigger: BaseTrigger, after: datetime, until: datetime | None = None) -> Iterator[datetime]:
    """UTC fire times strictly after ``after`` (and at most ``until``), in order."""
    now = after + timedelta(microseconds=1)
    previous = after
    while True:
        fire = trigger.get_next_fire_time(None, now)
        if fire is None:
            return
        fire = fire.astimezone(UTC)
        if fire <= previous:  # APScheduler can return a DST fold's instant again
            now += timedelta(seconds=1)
            continue
        if until is not None and fire > until:
            return
        yield fire
        previous, now = fire, fire + timedelta(microseconds=1)
