"""The invariants checked at quiescence, over the durable ledger and what the simulation saw."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from conveyor import envelope, persistence
from conveyor.runtime.failures import DLQ_HEADER

from tests.simulation.faults import INFRA, OUTAGE_MARK
from tests.simulation.world import MAX_ATTEMPTS, World

HOLD_BOUND = 120.0
"""Longest a delivery may be held (virtual seconds, in total) while its dependency answers its probe."""

INFRA_KINDS = {"StoreUnavailable", "TransientTransportError", "StoreError"}
"""Dead-letter error types that name an outage: an outage must never spend a message's attempts."""


@dataclass(frozen=True)
class Violation:
    """One broken invariant."""

    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def dead_letters(world: World) -> dict[tuple[str, str], list[dict[str, str]]]:
    """Dead letters by ``(handler, message)``: their ``conveyor-dlq-*`` headers (broker and held)."""
    found: dict[tuple[str, str], list[dict[str, str]]] = {}
    copies = [m for topic, sent in world.ledger.published.items() if topic.endswith(".dlq") for m in sent]
    held: dict[int, persistence.HeldMessage] = world.db.table("held_dead_letters")
    copies += [h.message for h in held.values()]
    for copy in copies:
        handler = copy.headers.get(DLQ_HEADER + "handler", "?")
        found.setdefault((handler, message_number(handler, copy)), []).append(dict(copy.headers))
    return found


def message_number(handler: str, message: envelope.WireMessage) -> str:
    """The simulation's name of a message: its number, and for ``sim.forward`` where it came from."""
    try:
        payload: Any = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return "?"
    if handler == "sim.forward":
        return f"{payload.get('via')}:{payload.get('n')}"
    return str(payload.get("n"))


def check(world: World, settled: bool) -> list[Violation]:
    """Every invariant, at the end of a run."""
    found: list[Violation] = []
    if not settled:
        found.append(Violation("no-unsettled", f"{world.unsettled()} deliveries or outbox rows still unsettled"))
    effects: Counter[tuple[str, str]] = Counter((h, n) for h, n, _ in world.db.table("effects"))
    letters = dead_letters(world)
    for (handler, n), headers in letters.items():
        for h in headers:
            if not h.get(DLQ_HEADER + "error-type") or not h.get(DLQ_HEADER + "error"):
                found.append(Violation("dead-letter-reason", f"{handler} {n} dead-lettered without a reason"))
            elif h[DLQ_HEADER + "error-type"] in INFRA_KINDS or OUTAGE_MARK in h[DLQ_HEADER + "error"]:
                found.append(Violation("outage-spent-attempts", f"{handler} {n}: {h[DLQ_HEADER + 'error-type']}"))
    expected = {("sim.apply", n) for n in world.sent} | {("sim.mirror", n) for n in world.sent}
    expected |= {("sim.forward", message_number("sim.forward", m)) for m in world.ledger.published.get("sim.out", [])}
    rows: dict[int, Any] = world.db.table("outbox")
    relayed = [envelope.WireMessage(r.message.body, r.message.headers) for r in rows.values()]
    expected |= {("sim.forward", message_number("sim.forward", m)) for m in relayed}
    mirrored = {message_number("sim.forward", m) for m in world.ledger.published.get("sim.out", [])}
    for handler, n in sorted(expected):
        applied = f"mirror:{n}" in mirrored if handler == "sim.mirror" else effects.get((handler, n), 0)
        dead = (handler, n) in letters
        if handler != "sim.mirror" and applied > 1:
            found.append(Violation("exactly-once", f"{handler} applied {n} {applied} times"))
        if not applied and not dead and settled:
            found.append(Violation("exactly-once", f"{handler} never applied {n} and did not dead-letter it"))
        if applied and dead and handler != "sim.mirror":
            kinds = ", ".join(h.get(DLQ_HEADER + "error-type", "?") for h in letters[handler, n])
            world.notes.append(f"{handler} applied {n} and also dead-lettered a copy ({kinds})")
    for (handler, n), runs in world.ledger.runs.items():
        charged = sum(1 for tx in runs if not tx.labels.get(INFRA))
        topic = "sim.in" if handler == "sim.apply" else "sim.out"
        copies = max(world.ledger.copies[topic, world.ledger.ids[handler, n]], 1)
        if charged > (MAX_ATTEMPTS + 1) * copies:
            found.append(
                Violation(
                    "run-bound", f"{handler} ran {n} {charged} times ({copies} copies, max_attempts={MAX_ATTEMPTS})"
                )
            )
    for token, seconds in world.ledger.holds.items():
        if seconds > HOLD_BOUND:
            owner = world.ledger.hold_owner[token]
            found.append(Violation("hold-bound", f"{owner} held {seconds:.0f}s while its dependency was healthy"))
    return found


def summary(world: World) -> str:
    """Counts for the report: faults injected, messages, dead letters."""
    injected = Counter(world.plan.injected)
    letters = sum(len(v) for v in dead_letters(world).values())
    faults = ", ".join(f"{k}={v}" for k, v in sorted(injected.items())) or "none"
    notes = f"; {len(world.notes)} copies dead-lettered after another copy applied" if world.notes else ""
    processes = len(world.processes)
    return f"{len(world.sent)} messages, {letters} dead letters, {processes} process(es){notes}; faults: {faults}"
