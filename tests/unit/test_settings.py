"""Configuration precedence and validation: defaults < pyproject < environment < flags."""

from pathlib import Path

import pytest
from conveyor import ConfigurationError, settings


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("CONVEYOR_"):
            monkeypatch.delenv(name)
    return tmp_path


def write_pyproject(text: str) -> None:
    Path("pyproject.toml").write_text(text)


def test_defaults_are_the_embedded_setup() -> None:
    config = settings.load()
    assert (config.broker_url, config.database_url, config.app, config.http_port) == (
        "memory://",
        "sqlite+aiosqlite:///conveyor.db",
        ("handlers", "schedules"),
        8000,
    )


def test_pyproject_overrides_defaults() -> None:
    write_pyproject('[tool.conveyor]\nbroker_url = "nats://10.0.0.1:4222"\nconcurrency = 4\n')
    config = settings.load()
    assert (config.broker_url, config.concurrency) == ("nats://10.0.0.1:4222", 4)


def test_environment_overrides_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    write_pyproject('[tool.conveyor]\nbroker_url = "nats://10.0.0.1:4222"\n')
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "amqp://guest:guest@localhost/")
    assert settings.load().broker_url == "amqp://guest:guest@localhost/"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "amqp://guest:guest@localhost/")
    assert settings.load(broker_url="kafka://k:9092", app=None).broker_url == "kafka://k:9092"


def test_app_list_is_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_APP", "billing, shipping")
    assert settings.load().app == ("billing", "shipping")


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("CONVEYOR_BROKER_URL", "redis://localhost", "CONVEYOR_BROKER_URL"),
        ("CONVEYOR_HTTP_PORT", "99999", "CONVEYOR_HTTP_PORT"),
        ("CONVEYOR_CONCURRENCY", "zero", "CONVEYOR_CONCURRENCY"),
        ("CONVEYOR_SERVICE", "Bad Name", "CONVEYOR_SERVICE"),
        ("CONVEYOR_LOG_FORMAT", "xml", "CONVEYOR_LOG_FORMAT"),
        ("CONVEYOR_LOG_LEVEL", "LOUD", "CONVEYOR_LOG_LEVEL"),
        ("CONVEYOR_LOG_LEVEL", "CRITICAL", "CONVEYOR_LOG_LEVEL"),
        ("CONVEYOR_BROKR_URL", "memory://", None),  # typo'd settings are ignored by the environment source
    ],
)
def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str | None) -> None:
    monkeypatch.setenv(env, value)
    if named is None:
        assert settings.load().broker_url == "memory://"
        return
    with pytest.raises(ConfigurationError, match=named):
        settings.load()


def test_unknown_key_in_pyproject_is_rejected() -> None:
    write_pyproject('[tool.conveyor]\nbrokr_url = "nats://x"\n')
    with pytest.raises(ConfigurationError, match="CONVEYOR_BROKR_URL"):
        settings.load()


def test_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_LOG_LEVEL", "warning")
    assert settings.load().log_level == "WARNING"
