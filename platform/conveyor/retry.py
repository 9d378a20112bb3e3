"""Retry policy: exponential backoff with jitter, bounded by a number of attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from conveyor import errors


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed message is retried before it is dead-lettered.

    The delay before attempt ``n + 1`` is ``initial_delay * multiplier ** (n - 1)``,
    capped at ``max_delay``, then spread by ``±jitter`` (a fraction) so that
    replicas that failed together do not retry together.

    Attributes:
        max_attempts: deliveries in all, the first included; at least 1.
        initial_delay: seconds before the first retry.
        max_delay: upper bound of any delay, in seconds.
        multiplier: growth factor per attempt; at least 1.
        jitter: fraction of the delay added or removed at random, 0 to 1.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise errors.ConfigurationError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise errors.ConfigurationError("retry delays must not be negative")
        if self.multiplier < 1:
            raise errors.ConfigurationError(f"retry multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise errors.ConfigurationError(f"retry jitter must be between 0 and 1, got {self.jitter}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        try:
            base = min(self.max_delay, self.initial_delay * self.multiplier ** max(attempt - 1, 0))
        except OverflowError:  # a huge attempt count (a hostile producer's, say) is just "the longest delay"
            base = self.max_delay
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(base, self.max_delay)

    def exhausted(self, attempt: int) -> bool:
        """True if attempt ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts


def seconds(value: timedelta | float | int | None) -> float | None:
    """A duration as seconds (``timedelta`` or a number)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)
