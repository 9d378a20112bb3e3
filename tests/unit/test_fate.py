"""The one decision of a failure's fate: a table of cases, properties over every input, and bounded holds."""

from __future__ import annotations

import asyncio

import pytest
from conveyor import Reject, Retry, envelope, errors, fate, on, ports, registry
from conveyor.retry import RetryPolicy
from conveyor.runtime.handling import HandlerExit
from conveyor.runtime.probes import Probes
from conveyor.runtime.worker import Worker
from conveyor.testing import Collector, unique, wait_for
from conveyor.transports.memory import MemoryTransport
from hypothesis import given
from hypothesis import strategies as st

POLICY = RetryPolicy(max_attempts=3, initial_delay=1.0, max_delay=10.0, jitter=0)
LIMITS = fate.Limits(POLICY, hold_limit=60.0, conflict_limit=2)
H, C, P = fate.Phase.HANDLER, fate.Phase.COMMIT, fate.Phase.PUBLISH
DB, BROKER = fate.Dependency.DATABASE, fate.Dependency.BROKER


def kind(outcome: fate.Outcome) -> str:
    if isinstance(outcome, fate.Hold):
        return f"{'recheck' if outcome.recheck else 'hold'}:{outcome.dependency}"
    return type(outcome).__name__


@pytest.mark.parametrize(
    ("phase", "error", "tries", "healthy", "expected"),
    [
        # outages: held only while the dependency fails its probe
        (H, errors.StoreUnavailable("refused"), fate.Tries(1), False, "hold:database"),
        (H, errors.StoreUnavailable("refused"), fate.Tries(1), True, "recheck:database"),  # once more: it may be over
        (H, errors.StoreUnavailable("refused"), fate.Tries(1, rechecked=True), True, "Retry"),
        (H, errors.StoreUnavailable("refused"), fate.Tries(1), None, "Retry"),
        (H, errors.StoreUnavailable("refused"), fate.Tries(3, rechecked=True), True, "DeadLetter"),
        (C, TimeoutError(), fate.Tries(1), False, "hold:database"),
        (C, TimeoutError(), fate.Tries(1, rechecked=True), True, "Retry"),  # a slow commit on a healthy database
        (C, TimeoutError(), fate.Tries(1, rechecked=True), False, "hold:database"),  # down again: held again
        (C, ConnectionResetError(), fate.Tries(1), False, "hold:database"),
        (P, errors.TransientTransportError("no answer"), fate.Tries(3), False, "hold:broker"),
        (P, TimeoutError(), fate.Tries(1), False, "hold:broker"),
        (H, errors.TransientTransportError("no answer"), fate.Tries(1), False, "hold:broker"),
        # bounded: past the hold limit, attempts count again
        (H, errors.StoreUnavailable("refused"), fate.Tries(1, held_for=60.0), False, "Retry"),
        (H, errors.StoreUnavailable("refused"), fate.Tries(3, held_for=61.0), False, "DeadLetter"),
        # the handler's own: never an outage, whatever its class
        (H, TimeoutError("its deadline"), fate.Tries(1), False, "Retry"),
        (H, ConnectionResetError("its HTTP call"), fate.Tries(1), False, "Retry"),
        (H, errors.StatementError("no such column", "sqlite:SQLITE_ERROR"), fate.Tries(1), None, "Retry"),
        (H, errors.StatementError("statement timeout", "57014"), fate.Tries(3), None, "DeadLetter"),
        (C, errors.StatementError("a CHECK failed", "23514"), fate.Tries(1), None, "Retry"),
        (H, ValueError("bug"), fate.Tries(2), None, "Retry"),
        (H, HandlerExit(SystemExit(3)), fate.Tries(3), None, "DeadLetter"),
        (H, errors.StoreError("unknown"), fate.Tries(1), None, "Retry"),
        # conflicts: re-run in place, with their own bound
        (C, errors.ConcurrencyConflict("40001"), fate.Tries(1), None, "hold:None"),
        (C, errors.ConcurrencyConflict("40001"), fate.Tries(1, conflicts=2), None, "Retry"),
        # signals and poison
        (H, Retry(delay=7.0), fate.Tries(1), None, "Retry"),
        (H, Retry(), fate.Tries(3), None, "DeadLetter"),
        (H, Reject("no"), fate.Tries(1), None, "DeadLetter"),
        (H, errors.InvalidMessage("bad"), fate.Tries(1), None, "DeadLetter"),
    ],
)
def test_decide_table(
    phase: fate.Phase, error: BaseException, tries: fate.Tries, healthy: bool | None, expected: str
) -> None:
    assert kind(fate.decide(phase, error, tries, LIMITS, healthy)) == expected


def test_retry_keeps_the_handlers_delay_and_reject_its_reason() -> None:
    assert fate.decide(H, Retry(delay=7.0), fate.Tries(1), LIMITS, None) == fate.Retry(7.0, "Retry", "retry requested")
    assert fate.decide(H, Reject("bad order"), fate.Tries(1), LIMITS, None) == fate.DeadLetter("Rejected", "bad order")


ERRORS = st.sampled_from(
    [
        errors.StoreUnavailable("down"),
        errors.TransientTransportError("down"),
        errors.StatementError("refused"),
        errors.ConcurrencyConflict("conflict"),
        errors.StoreError("other"),
        errors.TransportError("refused"),
        TimeoutError(),
        OSError("reset"),
        ValueError("bug"),
        Retry(),
        Retry(delay=2.0),
        Reject("no"),
        errors.InvalidMessage("bad"),
    ]
)
TRIES = st.builds(
    fate.Tries,
    attempt=st.integers(1, 10),
    held_for=st.floats(0, 120),
    holds=st.integers(0, 100),
    rechecked=st.booleans(),
    conflicts=st.integers(0, 5),
)


@given(st.sampled_from(list(fate.Phase)), ERRORS, TRIES, st.sampled_from([True, False, None]))
def test_decide_properties(phase: fate.Phase, error: BaseException, tries: fate.Tries, healthy: bool | None) -> None:
    outcome = fate.decide(phase, error, tries, LIMITS, healthy)
    if isinstance(outcome, fate.Hold):
        if outcome.dependency is None:  # a conflict: bounded by its own limit
            assert isinstance(error, errors.ConcurrencyConflict) and tries.conflicts < LIMITS.conflict_limit
        else:  # an outage: while the dependency fails its probe (or once more after), and only within the limit
            assert tries.held_for < LIMITS.hold_limit and outcome.dependency is fate.blamed(phase, error)
            assert healthy is False or (healthy is True and outcome.recheck and not tries.rechecked)
        assert 0 < outcome.pause <= fate.HOLD_PAUSES[1]
    elif isinstance(outcome, fate.DeadLetter):  # only when attempts are spent, or at once for poison
        assert tries.attempt >= POLICY.max_attempts or isinstance(error, Reject | errors.InvalidMessage)
    else:
        assert tries.attempt < POLICY.max_attempts
        assert 0 <= outcome.delay <= POLICY.max_delay


@given(st.sampled_from(list(fate.Phase)), ERRORS, st.integers(1, 10))
def test_decide_holds_a_message_whose_dependency_answers_once_at_most(
    phase: fate.Phase, error: BaseException, attempt: int
) -> None:
    tries = fate.Tries(attempt)
    for _ in range(3):
        outcome = fate.decide(phase, error, tries, LIMITS, True)
        if not isinstance(outcome, fate.Hold) or outcome.dependency is None:
            return
        assert outcome.recheck and not tries.rechecked
        tries = fate.Tries(attempt, rechecked=True)
    raise AssertionError("held again and again while the dependency answers")


async def test_a_hold_gives_up_after_the_hold_limit_and_attempts_count_again() -> None:
    topic, name = unique("held"), unique("held")
    runs: list[int] = []

    @on(topic, name=name, max_attempts=2, backoff=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0))
    async def needs_database(payload: dict) -> None:
        runs.append(1)
        raise errors.StoreUnavailable("the database does not answer")

    async def database() -> None:
        raise errors.StoreUnavailable("the database does not answer")  # down for good

    transport = MemoryTransport(f"memory://{unique('held')}")
    await transport.connect()
    dead = Collector()
    await transport.subscribe(ports.Subscription(name=unique("dlq"), topic=topic + ".dlq"), dead)
    probes = Probes(database, transport.check, ttl=0)
    worker = Worker(registry.Registry.of(needs_database).handlers, transport, source="t", probes=probes, hold_limit=1.0)
    await worker.start()
    await transport.publish(topic, envelope.to_binary(envelope.create(topic, {"n": 1}, source="t"), "ce-"))
    await wait_for(lambda: bool(dead.received), 20, "a dead letter once holds gave up")
    await worker.stop(5)
    headers = dead.received[0].message.headers
    assert (headers["conveyor-dlq-error-type"], headers["conveyor-dlq-attempts"]) == ("StoreUnavailable", "2")
    assert len(runs) > 2  # held (no attempt spent) for a while, then two attempts


async def test_probes_share_one_check_and_time_out() -> None:
    calls: list[int] = []

    async def slow() -> None:
        calls.append(1)
        await asyncio.sleep(10)

    probes = Probes(slow, None, timeout=0.1, ttl=5)
    results = await asyncio.gather(*(probes.healthy(fate.Dependency.DATABASE) for _ in range(20)))
    assert (results, len(calls)) == ([False] * 20, 1)
    assert await probes.healthy(fate.Dependency.BROKER) is None  # no probe: nothing is proven


@pytest.mark.parametrize(
    ("error", "ours"),
    [
        (errors.StoreUnavailable("down"), True),
        (errors.TransientTransportError("down"), True),
        (errors.ConcurrencyConflict("40001"), True),
        (errors.StoreError("unknown"), True),
        (errors.StatementError("CHECK failed", "23514"), False),
        (ValueError("the step's own"), False),
        (OSError("the step's HTTP call"), False),
        (TimeoutError(), False),
    ],
)
def test_not_the_callers_fault_spares_refused_statements_and_user_errors(error: Exception, ours: bool) -> None:
    assert fate.not_the_callers_fault(error) is ours
