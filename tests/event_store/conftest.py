"""Fixtures of the relay tests: a memory broker that records deliveries, and relays stopped after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from relay_helpers import Broker, Relays, open_broker


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A memory broker with one subscription on the relay tests' topic."""
    async with open_broker() as opened:
        yield opened


@pytest.fixture
async def relays() -> AsyncIterator[Relays]:
    """Relays started by the test; all stopped at teardown."""
    started = Relays()
    yield started
    await started.stop_all()
