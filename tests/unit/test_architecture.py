"""Dependency rules of the code base, checked on the source: `conveyor` reaches persistence through ports."""

from __future__ import annotations

import ast
from pathlib import Path

import conveyor

PACKAGE = Path(conveyor.__file__).parent
ASSEMBLY = {PACKAGE / "runtime" / "app.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_conveyor_imports_event_store_only_in_the_process_assembly() -> None:
    offenders = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path not in ASSEMBLY
        and any(name == "event_store" or name.startswith("event_store.") for name in imported_modules(path))
    )
    assert offenders == []
