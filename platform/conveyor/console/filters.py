"""Template filters: times, durations, rates, sparklines, and schedule triggers in words."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import jinja2
from markupsafe import Markup

from conveyor import envelope

_DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["", "January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]  # fmt: skip
_MACROS = {
    "@hourly": "every hour, on the hour",
    "@daily": "every day at 00:00",
    "@midnight": "every day at 00:00",
    "@weekly": "every Sunday at 00:00",
    "@monthly": "on the 1st of every month at 00:00",
    "@yearly": "every 1 January at 00:00",
    "@annually": "every 1 January at 00:00",
}


def iso(value: datetime | None) -> str:
    """An aware time as ISO 8601 UTC (``...Z``), for ``<time datetime>`` and the viewer's clock; ``""`` for None."""
    return "" if value is None else envelope.format_time(value.replace(microsecond=0))


def utc(value: datetime | None) -> str:
    """An aware time as ``YYYY-MM-DD HH:MM:SS UTC``; ``-`` for None."""
    return "-" if value is None else iso(value).replace("T", " ").replace("Z", " UTC")


def seconds(value: float | None) -> str:
    """A duration in seconds, in the unit that reads best (``350 ms``, ``2.5 s``, ``3 min``); ``-`` for None."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms" if value >= 0.001 else f"{value * 1000:.2f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def per_second(value: float) -> str:
    """A rate, ``12.3/s``."""
    return f"{value:.1f}/s" if value < 100 else f"{value:.0f}/s"


def percent(value: float | None) -> str:
    """A share (0-1) as a percentage; ``-`` for None."""
    return "-" if value is None else f"{value * 100:.1f} %"


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> Markup:
    """An inline SVG line of ``values`` (numbers only reach the markup), empty for fewer than two."""
    if len(values) < 2:
        return Markup("")
    top = max(max(values), 1e-9)
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(values))
    return Markup(
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="trend, peak {top:.1f}/s"><polyline points="{points}"/></svg>'
    )


def trigger_words(expression: str, tz: str, interval: timedelta | None = None) -> str:
    """A schedule's trigger in words (``every 5 minutes``, ``at 06:00, Monday to Friday (Europe/Berlin)``).

    Falls back to the expression itself where the words would not be simpler.
    """
    if interval is not None:
        return "every " + _interval(interval)
    zone = "" if tz == "UTC" else f" ({tz})"
    if expression.strip() in _MACROS:
        return _MACROS[expression.strip()] + zone
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        return expression
    sec, minute, hour, dom, month, dow = fields
    when = _time_of_day(sec, minute, hour)
    if when is None:
        return f"cron {expression}{zone}"
    days = _days(dom, month, dow)
    return f"{when}{', ' + days if days else ''}{zone}"


def _interval(value: timedelta) -> str:
    total = int(value.total_seconds())
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if total % size == 0 and total >= size:
            count = total // size
            return unit if count == 1 else f"{count} {unit}s"
    return str(value)


def _time_of_day(sec: str, minute: str, hour: str) -> str | None:
    if sec.startswith("*/") and minute == "*" and hour == "*":
        return f"every {sec[2:]} seconds"
    if sec != "0":
        return None
    if minute == "*" and hour == "*":
        return "every minute"
    if minute.startswith("*/") and hour == "*":
        return f"every {minute[2:]} minutes"
    if minute.isdigit() and hour == "*":
        return f"at minute {int(minute)} of every hour"
    if minute.isdigit() and hour.startswith("*/"):
        return f"every {hour[2:]} hours at minute {int(minute)}"
    hours = hour.split(",")
    if minute.isdigit() and all(h.isdigit() for h in hours):
        return "at " + ", ".join(f"{int(h):02d}:{int(minute):02d}" for h in hours)
    return None


def _days(dom: str, month: str, dow: str) -> str | None:
    parts = []
    if dow != "*":
        parts.append(_weekdays(dow))
    if dom != "*":
        parts.append(f"on day {dom} of the month")
    if month != "*":
        parts.append("in " + ", ".join(_MONTHS[int(m)] if m.isdigit() and 0 < int(m) < 13 else m
                                       for m in month.split(",")))  # fmt: skip
    return ", ".join(parts) or None


def _weekdays(dow: str) -> str:
    words = []
    for part in dow.split(","):
        first, _, last = part.partition("-")
        name = _day(first)
        words.append(f"{name} to {_day(last)}" if last else name)
    return ", ".join(words)


def _day(value: str) -> str:
    return _DAYS[int(value)] if value.isdigit() and int(value) < 8 else value.capitalize()


def install(env: jinja2.Environment) -> None:
    """Register the filters on a Jinja environment."""
    env.filters.update(iso=iso, utc=utc, seconds=seconds, per_second=per_second, percent=percent, sparkline=sparkline)
