"""Crash points for tests: kill the process at a named point, as a power cut would.

Set ``CONVEYOR_CRASH_AT`` to a point's name (e.g. ``relay.after-publish``) and
the process exits with status 70 the first time it reaches that point, without
running ``finally`` blocks or flushing anything, so a test can check what
survives a crash exactly there. Unset, :func:`maybe_crash` costs one dict
lookup.

Points:

* ``relay.after-publish``: a message was confirmed by the broker and not yet marked sent;
* ``handler.before-commit``: a handler returned, its unit of work is not committed;
* ``handler.after-commit``: a handler's unit of work committed, its message is not acknowledged.
"""

from __future__ import annotations

import os

ENV = "CONVEYOR_CRASH_AT"
EXIT_STATUS = 70


def maybe_crash(point: str) -> None:
    """Exit the process at once with status 70 if ``CONVEYOR_CRASH_AT`` equals ``point``."""
    if os.environ.get(ENV) == point:
        os._exit(EXIT_STATUS)
