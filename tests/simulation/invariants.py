"""The invariants checked at quiescence, over the durable ledger and what the simulation saw.

* ``no-unsettled``: quiescence was reached (no delivery queued or in hand, no
  unsent outbox row, no saga running) within the settle time;
* ``exactly-once``: every message was applied exactly once by each handler,
  or dead-lettered (``dead-letter-reason``: with a type and a reason);
* ``applied-and-dead``: no copy was dead-lettered once its message was
  applied (the inbox makes it a duplicate, however often it was delivered);
* ``outage-spent-attempts``: no dead letter's reason is an error of an
  outage window (a dependency down, failing its probe);
* ``run-bound``: at most ``max_attempts + 1`` runs per copy of a message
  (runs ended by an outage, which spend no attempt, not counted);
* ``hold-bound``: no delivery held longer than :data:`HOLD_BOUND` in all
  while its dependency was healthy (watched through ``HandlerRunner.hold``);
* ``cron-once`` / ``cron-gap``: each claimed fire ran once (or was
  dead-lettered), and no fire was left out;
* ``saga-*``: every trip saga ended, each booking and undo applied once, a
  compensated trip kept no booking, and undos ran last step first.

Findings that break no invariant (a copy dead-lettered before another copy
applied the message, or while the database failed the inbox question three
times; a message dead-lettered for too many deliveries that was never applied)
are counted in the summary.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from conveyor import envelope, persistence
from conveyor.runtime.failures import DLQ_HEADER

from tests.simulation import trips
from tests.simulation.faults import INFRA, OUTAGE_MARK
from tests.simulation.world import EPOCH, MAX_ATTEMPTS, TICK, World

HOLD_BOUND = 120.0
"""Longest a delivery may be held (virtual seconds, in total) while its dependency answers its probe."""

INFRA_KINDS = {"StoreUnavailable", "TransientTransportError", "StoreError"}
AT = "sim-at"
"""A pseudo-header of a dead letter as :func:`dead_letters` returns it: when it was written (virtual seconds)."""
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
    copies = [
        (m, world.ledger.sent_at.get(m.message_id or "", 0.0))
        for topic, sent in world.ledger.published.items()
        if topic.endswith(".dlq")
        for m in sent
    ]
    held: dict[int, persistence.HeldMessage] = world.db.table("held_dead_letters")
    copies += [(h.message, (h.held_at - EPOCH).total_seconds()) for h in held.values()]
    for copy, at in copies:
        handler = copy.headers.get(DLQ_HEADER + "handler", "?")
        headers = {**copy.headers, AT: str(at)}
        found.setdefault((handler, message_number(handler, copy)), []).append(headers)
    return found


def spent_by_outage(headers: dict[str, str]) -> bool:
    """Whether a dead letter's reason is an error injected during an outage window (the dependency was down).

    A connection error while the dependency answers its probe is the
    attempt's failure and may spend attempts; one during an outage must not.
    """
    return OUTAGE_MARK in headers.get(DLQ_HEADER + "error", "")


def message_number(handler: str, message: envelope.WireMessage) -> str:
    """The simulation's name of a message: its number, and for ``sim.forward`` where it came from."""
    try:
        payload: Any = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return "?"
    if not isinstance(payload, dict):  # a saga timer carries no data: name it by its saga instance
        return str(message.key or message.headers.get(envelope.NATS_PREFIX + "partitionkey", "?"))
    if handler == "sim.forward":
        return f"{payload.get('via')}:{payload.get('n')}"
    if "trip" in payload:
        return str(payload["trip"])
    if "fire_time" in payload:
        return str(payload["fire_time"])
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
            elif spent_by_outage(h):
                found.append(Violation("outage-spent-attempts", f"{handler} {n}: {h[DLQ_HEADER + 'error-type']}"))
    expected = {("sim.apply", n) for n in world.sent} | {("sim.mirror", n) for n in world.sent}
    expected |= {("sim.forward", message_number("sim.forward", m)) for m in world.ledger.published.get("sim.out", [])}
    rows: dict[int, Any] = world.db.table("outbox")
    relayed = [
        envelope.WireMessage(r.message.body, r.message.headers) for r in rows.values() if r.message.topic == "sim.out"
    ]
    expected |= {("sim.forward", message_number("sim.forward", m)) for m in relayed}
    mirrored = {message_number("sim.forward", m) for m in world.ledger.published.get("sim.out", [])}
    for handler, n in sorted(expected):
        applied = f"mirror:{n}" in mirrored if handler == "sim.mirror" else effects.get((handler, n), 0)
        dead = (handler, n) in letters
        if handler != "sim.mirror" and applied > 1:
            found.append(Violation("exactly-once", f"{handler} applied {n} {applied} times"))
        if (
            not applied
            and dead
            and any(h.get(DLQ_HEADER + "error-type") == "TooManyDeliveries" for h in letters[handler, n])
        ):
            world.notes.append(f"{handler} {n} dead-lettered for too many deliveries, never applied")
        if not applied and not dead and settled:
            found.append(Violation("exactly-once", f"{handler} never applied {n} and did not dead-letter it"))
        if applied and dead and handler != "sim.mirror":  # dead-lettered first, applied by a later copy
            kinds = ", ".join(h.get(DLQ_HEADER + "error-type", "?") for h in letters[handler, n])
            world.notes.append(f"{handler} applied {n} and also dead-lettered a copy ({kinds})")
    for (handler, n), runs in world.ledger.runs.items():
        charged = sum(1 for tx in runs if not tx.labels.get(INFRA))
        topic = {"sim.apply": "sim.in", "sim.forward": "sim.out"}.get(handler, "schedules.sim.tick")
        copies = max(world.ledger.copies[topic, world.ledger.ids[handler, n]], 1)
        if charged > (MAX_ATTEMPTS + 1) * copies:
            found.append(
                Violation(
                    "run-bound", f"{handler} ran {n} {charged} times ({copies} copies, max_attempts={MAX_ATTEMPTS})"
                )
            )
    found += [
        Violation("applied-and-dead", f"dead-lettered after it was applied: {d}")
        for d in world.ledger.dead_after_applied
    ]
    found += check_cron(world, effects, letters)
    found += check_sagas(world, letters)
    for token, seconds in world.ledger.holds.items():
        if seconds > HOLD_BOUND:
            owner = world.ledger.hold_owner[token]
            found.append(Violation("hold-bound", f"{owner} held {seconds:.0f}s while its dependency was healthy"))
    return found


def check_cron(
    world: World, effects: Counter[tuple[str, str]], letters: dict[tuple[str, str], list[dict[str, str]]]
) -> list[Violation]:
    """Each claimed fire of ``sim.tick`` ran exactly once (or was dead-lettered), and no fire was left out."""
    found: list[Violation] = []
    runs: dict[int, persistence.Run] = world.db.table("schedule_runs")
    fires = sorted(run.fire_time for run in runs.values() if run.schedule == "sim.tick")
    for earlier, later in itertools.pairwise(fires):
        if later - earlier != TICK:
            found.append(Violation("cron-gap", f"fires {earlier:%H:%M:%S} and {later:%H:%M:%S} are not {TICK} apart"))
    job = "schedules.sim.tick"
    for fire in fires:
        name = envelope.format_time(fire)
        applied, dead = effects.get(("sim.tick", name), 0), (job, name) in letters
        if applied > 1:
            found.append(Violation("cron-once", f"fire {name} ran {applied} times"))
        elif not applied and not dead:
            found.append(Violation("cron-once", f"fire {name} never ran and was not dead-lettered"))
    return found


def check_sagas(world: World, letters: dict[tuple[str, str], list[dict[str, str]]]) -> list[Violation]:
    """Every trip saga ended; bookings and undos applied once each; undos last step first."""
    found: list[Violation] = []
    records: dict[tuple[str, str], Any] = world.db.table("sagas")
    ledger: dict[tuple[str, str, str, int], Any] = world.db.table(trips.LEDGER)
    for trip in world.trips:
        record = records.get(("sim.trip", trip))
        if record is None:
            if ("sagas.sim.trip.start", trip) not in letters:
                found.append(
                    Violation("saga-terminal", f"trip {trip} never started and its start was not dead-lettered")
                )
            continue
        status = record.instance.status.value
        if status not in ("completed", "compensated", "failed"):
            found.append(Violation("saga-terminal", f"trip {trip} is still {status}"))
            continue
        rows = [(what, service, value) for (what, service, t, _), value in ledger.items() if t == trip]
        counts = Counter((what, service) for what, service, _ in rows)
        for (what, service), count in counts.items():
            if count > 1:
                found.append(Violation("saga-once", f"trip {trip}: {what} {service} applied {count} times"))
        booked = {service for what, service, _ in rows if what == "book"}
        undone = {service: value for what, service, value in rows if what == "undo"}
        if status == "completed" and (undone or booked != set(trips.SERVICES)):
            found.append(Violation("saga-consistency", f"trip {trip} completed with {sorted(counts)}"))
        if status == "compensated":
            if booked - set(undone):
                found.append(Violation("saga-undo", f"trip {trip} compensated but {sorted(booked - set(undone))} kept"))
            if len(undone) == 2 and undone["car"] > undone["hotel"]:
                found.append(Violation("saga-undo-order", f"trip {trip}: the hotel was undone before the car"))
    return found


def summary(world: World) -> str:
    """Counts for the report: faults injected, messages, dead letters."""
    injected = Counter(world.plan.injected)
    letters = sum(len(v) for v in dead_letters(world).values())
    faults = ", ".join(f"{k}={v}" for k, v in sorted(injected.items())) or "none"
    spurious = sum("also dead-lettered" in note for note in world.notes)
    unanswered = sum("the inbox unanswered" in note for note in world.notes)
    burnt = len(world.notes) - spurious - unanswered
    notes = f"; {spurious} copies dead-lettered before another copy applied the message" if spurious else ""
    notes += f"; {unanswered} dead-lettered though applied, the inbox failing to answer" if unanswered else ""
    notes += f"; {burnt} dead-lettered for too many deliveries, never applied" if burnt else ""
    processes = len(world.processes)
    return f"{len(world.sent)} messages, {letters} dead letters, {processes} process(es){notes}; faults: {faults}"
