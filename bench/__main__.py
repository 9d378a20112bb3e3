"""``python -m bench``: every performance row, Conveyor against the raw clients, interleaved.

Options: ``--runs N`` (default 3), ``--only SUBSTRING`` (rows whose name contains it).
The README's "Performance" table is this command's output.
"""

from __future__ import annotations

import importlib

from bench import harness

SUITES = ("suite_brokers", "suite_kafka", "suite_persistence", "suite_memory")


def _suites() -> list[harness.Suite]:
    found = []
    for name in SUITES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            continue
        found.append(module.suite)
    return found


if __name__ == "__main__":
    harness.main_for(*_suites())
