"""The benchmark harness: each row runs its raw-client variant and its Conveyor variant, interleaved.

A *suite* is an async context manager that sets up what its rows share (a
broker, a scratch database) and yields its :class:`Row` objects. For every
row, :func:`run_suite` runs the two variants ``runs`` times, alternating which
goes first, so drift on a noisy machine hits both sides alike; the table shows
min / median / max of each and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""The local RabbitMQ node the rows use; its queues named by this run are deleted at the end."""

Measure = Callable[[], Awaitable[float]]
"""Runs one measurement and returns its figure (a rate, unless the row says otherwise)."""


@dataclass(frozen=True)
class Row:
    """One line of the performance table.

    Attributes:
        name: what is measured, e.g. ``"rabbit consume"``.
        raw: the fastest fair raw-client variant.
        conveyor: the same work through Conveyor.
        goal: the ratio (Conveyor / raw, of medians) the row should reach.
        unit: the unit of both figures.
        higher_is_better: False for latencies and sizes: the ratio is then raw / Conveyor.
        note: how the two sides are set up, printed under the table.
        budget: an absolute goal instead of a ratio: for ``msg/s`` rows, the
            most microseconds per message Conveyor may add to raw; for other
            units, the most Conveyor's median may exceed raw's.
    """

    name: str
    raw: Measure
    conveyor: Measure
    goal: float
    unit: str = "msg/s"
    higher_is_better: bool = True
    note: str = ""
    budget: float | None = None


@dataclass
class Outcome:
    """The figures of one row after all runs."""

    row: Row
    raw: list[float] = field(default_factory=list)
    conveyor: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Conveyor's median over raw's (inverted where lower is better)."""
        raw, ours = statistics.median(self.raw), statistics.median(self.conveyor)
        if self.row.higher_is_better:
            return ours / raw if raw else float("nan")
        return raw / ours if ours else float("nan")

    @property
    def extra(self) -> float:
        """What Conveyor adds: microseconds per message for rates, else the difference of medians."""
        raw, ours = statistics.median(self.raw), statistics.median(self.conveyor)
        if self.row.unit.endswith("/s"):  # a rate: microseconds per item
            return 1e6 / ours - 1e6 / raw
        return ours - raw

    @property
    def met(self) -> bool:
        """Whether the row reaches its goal (its budget where it has one, else its ratio)."""
        if self.row.budget is not None:
            return self.extra <= self.row.budget
        return self.ratio >= self.row.goal

    @property
    def goal_text(self) -> str:
        """The goal as printed."""
        if self.row.budget is not None:
            unit = "µs each" if self.row.unit.endswith("/s") else self.row.unit
            return f"<= +{self.row.budget:g} {unit}"
        return f">= {self.row.goal:g}x"  # the ratio is always oriented so that higher is better


Suite = Callable[[], contextlib.AbstractAsyncContextManager[Sequence[Row]]]


async def run_suite(suite: Suite, runs: int, only: str | None = None) -> list[Outcome]:
    """Run every row of ``suite`` ``runs`` times, raw and Conveyor interleaved."""
    outcomes: list[Outcome] = []
    async with suite() as rows:
        for row in rows:
            if only and only not in row.name:
                continue
            outcome = Outcome(row)
            for run in range(runs):
                order = (("raw", row.raw), ("conveyor", row.conveyor))
                for side, measure in order if run % 2 == 0 else reversed(order):
                    gc.collect()
                    getattr(outcome, side).append(await measure())
            outcomes.append(outcome)
            print(format_row(outcome), flush=True)
    return outcomes


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def _spread(values: Sequence[float]) -> str:
    return f"{_figure(min(values))} / {_figure(statistics.median(values))} / {_figure(max(values))}"


HEADER = (
    "| path | unit | raw min / median / max | Conveyor min / median / max | ratio | Conveyor adds | goal |\n"
    "|---|---|---|---|---|---|---|"
)


def format_row(outcome: Outcome) -> str:
    """One markdown table line."""
    row = outcome.row
    mark = "" if outcome.met else " (not met)"
    extra = f"{outcome.extra:+.1f} µs each" if row.unit.endswith("/s") else f"{outcome.extra:+.1f} {row.unit}"
    return (
        f"| {row.name} | {row.unit} | {_spread(outcome.raw)} | {_spread(outcome.conveyor)} "
        f"| {outcome.ratio:.2f} | {extra} | {outcome.goal_text}{mark} |"
    )


def format_table(outcomes: Sequence[Outcome]) -> str:
    """The whole table, with each row's note below it."""
    lines = [HEADER, *(format_row(o) for o in outcomes)]
    notes = [f"- **{o.row.name}**: {o.row.note}" for o in outcomes if o.row.note]
    return "\n".join([*lines, *(["", *notes] if notes else [])])


@contextlib.asynccontextmanager
async def rows_only(rows: Sequence[Row]) -> AsyncIterator[Sequence[Row]]:
    """A suite with nothing to set up."""
    yield rows


def machine() -> str:
    """One line about where the figures come from."""
    import os
    import platform
    import sys

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, {platform.system()} {platform.release()}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every suite takes: ``--runs N``, ``--only SUBSTRING`` and ``--loop asyncio|uvloop``."""
    parser = argparse.ArgumentParser(description="Conveyor against the raw clients, interleaved")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side per row (default 3)")
    parser.add_argument("--only", default=None, help="run only rows whose name contains this")
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop for both sides (default asyncio)"
    )
    return parser.parse_args(argv)


def main_for(*suites: Suite, argv: Sequence[str] | None = None) -> None:
    """Run suites from the command line and print the table."""
    args = parse_args(argv)
    outcomes: list[Outcome] = []

    async def run_all() -> None:
        try:
            for suite in suites:
                outcomes.extend(await run_suite(suite, args.runs, args.only))
        finally:  # the queues this run declared (named with its unique() tokens), messages and all
            from conveyor.testing import brokers

            with contextlib.suppress(Exception):
                await brokers.delete_test_queues(RABBIT_URL)

    print(f"{machine()}; {args.loop} event loop; {args.runs} runs per side, interleaved\n{HEADER}", flush=True)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run_all())
    else:
        asyncio.run(run_all())
    print("\n" + format_table(outcomes))
