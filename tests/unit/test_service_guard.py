"""The test-service guard: in CI a missing service fails the test, however CI spells it."""

from __future__ import annotations

import socket

import pytest
from conveyor.testing import brokers


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "github-actions"])
def test_missing_service_in_ci_fails_whatever_ci_is_set_to(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception):
        brokers.require_service("RabbitMQ", "127.0.0.1", closed_port())


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_missing_service_outside_ci_skips(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception):
        brokers.require_service("RabbitMQ", "127.0.0.1", closed_port())
