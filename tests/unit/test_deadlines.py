"""Deadlines: one timer per handler, asyncio.timeout's semantics for every attempt."""

from __future__ import annotations

import asyncio

import pytest
from conveyor.deadlines import Deadlines


async def _attempt(deadlines: Deadlines, seconds: float) -> str:
    deadline = deadlines.start()
    try:
        try:
            await asyncio.sleep(seconds)
            return "finished"
        except asyncio.CancelledError:
            if deadlines.finish(deadline):
                raise TimeoutError from None
            raise
        finally:
            deadlines.finish(deadline)
    except TimeoutError:
        return "timed out"


async def test_each_attempt_times_out_at_its_own_deadline_whatever_finishes_first() -> None:
    deadlines = Deadlines(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow_first = asyncio.ensure_future(_attempt(deadlines, 5))
    await asyncio.sleep(0.05)
    quick = asyncio.ensure_future(_attempt(deadlines, 0.01))
    slow_second = asyncio.ensure_future(_attempt(deadlines, 5))
    assert await quick == "finished"
    assert await slow_first == "timed out"
    first_at = loop.time() - started
    assert await slow_second == "timed out"
    second_at = loop.time() - started
    assert 0.2 <= first_at < second_at, (first_at, second_at)
    assert second_at >= 0.25, second_at  # the second started 0.05 s later: its own deadline, not the first's
    assert deadlines.running == 0


async def test_a_cancellation_from_outside_is_not_a_timeout() -> None:
    deadlines = Deadlines(10)
    task = asyncio.ensure_future(_attempt(deadlines, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.running == 0


async def test_no_timeout_means_no_deadline() -> None:
    deadlines = Deadlines(None)
    assert await _attempt(deadlines, 0.01) == "finished"
    assert deadlines.start() is None and deadlines.running == 0


async def test_finished_attempts_leave_nothing_behind_and_the_next_one_still_times_out() -> None:
    deadlines = Deadlines(0.1)
    assert await asyncio.gather(*(_attempt(deadlines, 0) for _ in range(1000))) == ["finished"] * 1000
    assert deadlines.running == 0
    assert await _attempt(deadlines, 5) == "timed out"
