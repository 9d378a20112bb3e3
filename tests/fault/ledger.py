"""The fault tier's oracle and report.

The oracle is a ledger of effects: the application under test (:data:`APP`)
inserts one row per handled message *inside the handler's transaction*, so a
row exists exactly when the effect committed. After a scenario, every expected
message must have exactly one row: a missing one is *lost*, a second one is
*doubled*. Rows carry the wall-clock time of the effect, from which the longest
stall (the longest time without progress while work remained) is measured.

Each scenario ends with :func:`report`, which appends one JSON line to the
results file; :func:`table` renders them.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa

from event_store.database import normalize_url

APP = """
import os
import time

import sqlalchemy as sa

from conveyor import Context, on


@on(
    os.environ["FAULT_TOPIC"],
    name=os.environ["FAULT_HANDLER"],
    concurrency=int(os.environ.get("FAULT_CONCURRENCY", "8")),
    max_attempts=int(os.environ.get("FAULT_MAX_ATTEMPTS", "5")),
    timeout=float(os.environ.get("FAULT_TIMEOUT", "30")),
)
async def apply(payload: dict, ctx: Context) -> None:
    async with ctx.transaction() as tx:
        await tx.session.execute(
            sa.text("INSERT INTO ledger (message_id, n, pid, at) VALUES (:id, :n, :pid, :at)"),
            {"id": ctx.message.id, "n": int(payload["n"]), "pid": os.getpid(), "at": time.time()},
        )
"""
"""The application module (``faultapp``): one handler writing the ledger inside its transaction.

Environment: ``FAULT_TOPIC``, ``FAULT_HANDLER``, optional ``FAULT_CONCURRENCY``
(default 8), ``FAULT_MAX_ATTEMPTS`` (default 5) and ``FAULT_TIMEOUT`` (seconds an
attempt may run, default 30; on NATS it sets ``ack_wait`` = timeout + 30 s).
Payloads are ``{"n": int}``.
"""

LEDGER_DDL = (
    "CREATE TABLE ledger (message_id VARCHAR(64) NOT NULL, n INTEGER NOT NULL, pid INTEGER NOT NULL, at FLOAT NOT NULL)"
)


def write_app(directory: Path) -> dict[str, str]:
    """Write :data:`APP` as ``faultapp.py`` into ``directory``; the environment that loads it."""
    (directory / "faultapp.py").write_text(APP)
    return {"CONVEYOR_APP": "faultapp", "CONVEYOR_APP_DIR": str(directory)}


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(normalize_url(url, sync=True))


def create_ledger(url: str) -> None:
    """Create the ledger table in the (migrated) database at ``url``."""
    engine = _engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(LEDGER_DDL))
    finally:
        engine.dispose()


def effects(url: str) -> list[tuple[int, float]]:
    """Every ledger row as ``(n, at)``, in commit-time order."""
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT n, at FROM ledger ORDER BY at")).all()
    finally:
        engine.dispose()
    return [(int(n), float(at)) for n, at in rows]


@dataclass(frozen=True, slots=True)
class Tally:
    """What the ledger shows against what was expected."""

    handled: int
    lost: int
    doubled: int


def tally(rows: Sequence[tuple[int, float]], expected: Iterable[int]) -> Tally:
    """Count lost (expected, no row) and doubled (rows beyond the first per n) effects."""
    wanted = set(expected)
    seen: dict[int, int] = {}
    for n, _ in rows:
        seen[n] = seen.get(n, 0) + 1
    return Tally(
        handled=len(seen.keys() & wanted),
        lost=len(wanted - seen.keys()),
        doubled=sum(count - 1 for count in seen.values()),
    )


def longest_stall(rows: Sequence[tuple[int, float]], since: float, until: float | None = None) -> float:
    """Longest time without a new effect between ``since`` and the last row (or ``until``).

    Call it with ``since`` = when the fault ended (a restart, a restored
    connection) to measure how long recovery left work waiting.
    """
    times = sorted(at for _, at in rows if at >= since)
    if not times:
        return float("inf") if until is None else max(0.0, until - since)
    points = [since, *times]
    return max(b - a for a, b in itertools.pairwise(points)) if len(points) > 1 else 0.0


@dataclass(frozen=True, slots=True)
class Result:
    """One scenario's line in the report."""

    scenario: str
    broker: str
    load: int
    """Messages (or runs, requests) the scenario expected to take effect."""
    faults: int
    """Faults injected: kills, restarts, outages."""
    bad_inputs: int
    """Hostile inputs tried."""
    lost: int
    doubled: int
    stalled_s: float
    """Longest time without progress after the fault ended, in seconds."""
    limit_s: float
    """The longest stall the retry and outage policy allows for this scenario."""

    @property
    def ok(self) -> bool:
        """No loss, no double, no stall beyond the policy's limit."""
        return self.lost == 0 and self.doubled == 0 and self.stalled_s <= self.limit_s


def results_path() -> Path:
    """The JSON-lines file of this run (``CONVEYOR_FAULT_RESULTS``)."""
    default = Path(tempfile.gettempdir()) / "conveyor-fault-results.jsonl"
    return Path(os.environ.get("CONVEYOR_FAULT_RESULTS", str(default)))


_started: set[Path] = set()


def report(result: Result) -> Result:
    """Append ``result`` to the results file (emptied at the first report of a run); return it."""
    path = results_path()
    mode = "a" if path in _started else "w"
    _started.add(path)
    with path.open(mode) as out:
        out.write(json.dumps({**asdict(result), "ok": result.ok}) + "\n")
    return result


def results() -> list[Result]:
    """The results recorded by this run."""
    path = results_path()
    if path not in _started or not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Result(**{k: v for k, v in row.items() if k != "ok"}) for row in rows]


def table(rows: Sequence[Result]) -> str:
    """The results as a Markdown table (the README's "Reliability" figures)."""
    head = "| scenario | broker | load | faults | bad inputs | lost | doubled | stalled s (limit) | ok |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.broker} | {r.load:,} | {r.faults} | {r.bad_inputs} | {r.lost} | {r.doubled} "
            f"| {r.stalled_s:.1f} ({r.limit_s:.0f}) | {'yes' if r.ok else 'NO'} |"
        )
    return "\n".join(lines)
