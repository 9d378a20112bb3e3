"""Long-lived processes run on uvloop when it is installed, unless CONVEYOR_EVENT_LOOP says otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest
from conveyor import errors
from conveyor.runtime import app
from conveyor.settings import Settings


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_process_runs_on_the_chosen_loop(choice: str, expected: str) -> None:
    module = app.run_process(Settings(event_loop=choice), _loop_module())  # type: ignore[arg-type]
    assert module.split(".")[0] == expected


def test_auto_falls_back_to_asyncio_and_uvloop_without_it_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert app.run_process(Settings(event_loop="auto"), _loop_module()).startswith("asyncio")
    with pytest.raises(errors.ConfigurationError, match=r"pip install 'conveyor\[speed\]'"):
        app.run_process(Settings(event_loop="uvloop"), _loop_module())
