"""The fault tier: real ``conveyor`` processes against real brokers and PostgreSQL, with faults injected.

Every test here is marked ``fault`` (``pytest -m fault`` runs the tier alone)
and records one JSON line per scenario through :func:`ledger.report`. At the end
of the session the lines are printed as a table (load, faults injected, bad
inputs tried, lost, doubled, stalled seconds) and kept in
``CONVEYOR_FAULT_RESULTS`` (default ``conveyor-fault-<pid>.jsonl`` in the
temporary directory, one file per run).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "e2e"))
sys.path.insert(0, str(HERE.parent / "support"))

import ledger  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # One results file per run unless one is named: two sessions sharing the default file
    # would each empty it at their first report and print the other's rows.
    if "CONVEYOR_FAULT_RESULTS" not in os.environ:
        os.environ["CONVEYOR_FAULT_RESULTS"] = str(Path(tempfile.gettempdir()) / f"conveyor-fault-{os.getpid()}.jsonl")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.fault)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = ledger.results()
    if rows:
        terminalreporter.write_sep("=", "fault tier")
        terminalreporter.write_line(ledger.table(rows))
        terminalreporter.write_line(f"(results in {ledger.results_path()})")
