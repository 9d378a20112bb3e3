"""Retry policy: exponential growth, cap, jitter bounds, validation."""

import pytest
from conveyor import ConfigurationError, RetryPolicy


def test_delays_grow_exponentially_until_the_cap() -> None:
    policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(initial_delay=10, multiplier=1, max_delay=100, jitter=0.2)
    delays = {policy.delay(1) for _ in range(200)}
    assert all(8 <= d <= 12 for d in delays) and len(delays) > 1


def test_exhausted_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in (1, 2, 3)] == [False, False, True]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": -1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_invalid_policy_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_delay_for_a_huge_attempt_is_the_longest_delay_not_an_overflow() -> None:
    assert RetryPolicy(max_delay=60, jitter=0).delay(100_000) == 60
