"""Configuration: defaults < ``[tool.conveyor]`` in pyproject.toml < ``CONVEYOR_*`` environment < CLI flags.

Every setting is validated at start-up; a bad value stops the process with a
message naming the setting (exit code 2), never at the first message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
)

from conveyor import errors, names, transports

ENV_PREFIX = "CONVEYOR_"


class Settings(BaseSettings):
    """Conveyor's settings. Each can be set as ``CONVEYOR_<NAME>`` or in ``[tool.conveyor]``.

    Attributes:
        service: this service's name; the CloudEvents ``source`` of what it publishes.
        broker_url: ``memory://``, ``kafka://host:port[,host:port]``,
            ``amqp://user:pass@host:port/vhost`` or ``nats://host:port``.
        database_url: SQLAlchemy async URL of the service's database.
        app: modules (or packages) that declare handlers and schedules.
        app_dir: directory the application modules are imported from.
        http_host: address of the HTTP server (health, metrics, ingest).
        http_port: its port; 0 turns the server off.
        ingest_token: bearer token required by ``POST /events/{topic}``, if set.
        ingest_tokens: per-tenant bearer tokens (a JSON object, token -> tenant):
            an event posted with one belongs to that tenant, and a caller
            cannot post as another.
        max_message_bytes: largest message accepted; larger ones are dead-lettered
            (or answered 413 over HTTP).
        concurrency: default number of messages one handler runs at once per process.
        drain_timeout: seconds in-flight work may take to finish after SIGTERM.
        retention: seconds sent outbox rows, inbox rows and finished schedule
            runs are kept (default 7 days); longer than any redelivery can take.
        saga_retention: seconds a finished saga instance (``completed`` or
            ``compensated``) and its step log are kept after its last change
            (default 7 days); parked and unfinished instances are kept.
        relay_max_attempts: publishes of one outbox message the broker may
            refuse before the relay parks it (``conveyor outbox list --parked``);
            an unreachable broker spends none.
        stall_after: seconds after which ``/readyz`` reports a stall: a message
            a handler has had in hand this long (longer than twice its timeout,
            if that is more), a due outbox message unsent this long with no
            publish meanwhile, a schedule fire overdue this long.
        hold_limit: seconds one message may be held through outages of the
            database or the broker (no attempt spent, confirmed by a probe of
            the dependency) before its failures spend attempts again.
        commit_timeout: seconds Conveyor's commit of a handler's unit of work
            may take, apart from the handler's own timeout; a commit past it
            blames the database (held while its probe fails).
        plain_messages: every handler also accepts messages that are not
            CloudEvents (a plain body, as ``@on(..., plain=True)`` does for one
            handler); CloudEvents are still validated.
        log_level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
        log_format: ``text`` (human-readable lines) or ``json`` (one object per line).
        console: serve the operations console at ``/console`` (see :mod:`conveyor.console`);
            unset means on in ``conveyor run`` and off in every other process type.
        console_token: the console's credential (login form or bearer token);
            required for actions, except in ``conveyor run`` bound to a loopback address.
        console_readonly: the console only shows: actions are hidden and refused (403).
        event_loop: ``auto`` runs long-lived processes on uvloop when it is
            installed (``pip install 'conveyor[speed]'``), ``asyncio`` never,
            ``uvloop`` always (an error if it is missing).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        pyproject_toml_table_header=("tool", "conveyor"),
        validate_default=True,
    )

    service: str = "conveyor"
    broker_url: str = "memory://"
    database_url: str = "sqlite+aiosqlite:///conveyor.db"
    app: Annotated[tuple[str, ...], NoDecode] = ("handlers", "schedules")
    app_dir: str = "."
    http_host: str = "127.0.0.1"
    http_port: int = pydantic.Field(default=8000, ge=0, le=65535)
    ingest_token: pydantic.SecretStr | None = None
    ingest_tokens: dict[str, str] = pydantic.Field(default_factory=dict, repr=False)
    max_message_bytes: int = pydantic.Field(default=1024 * 1024, ge=1024)
    concurrency: int = pydantic.Field(default=16, ge=1, le=10_000)
    drain_timeout: float = pydantic.Field(default=30.0, ge=0)
    retention: float = pydantic.Field(default=7 * 24 * 3600, ge=60)
    saga_retention: float = pydantic.Field(default=7 * 24 * 3600, ge=60)
    relay_max_attempts: int = pydantic.Field(default=10, ge=1, le=1000)
    stall_after: float = pydantic.Field(default=60.0, gt=0)
    hold_limit: float = pydantic.Field(default=900.0, ge=0)
    commit_timeout: float = pydantic.Field(default=30.0, gt=0)
    plain_messages: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    console: bool | None = None
    console_token: pydantic.SecretStr | None = None
    console_readonly: bool = False
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @pydantic.field_validator("service")
    @classmethod
    def _service_name(cls, value: str) -> str:
        return names.check("service name", value)

    @pydantic.field_validator("console_token")
    @classmethod
    def _console_token(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the console token must be at least 16 characters")
        return value

    @pydantic.field_validator("ingest_tokens")
    @classmethod
    def _tenants(cls, value: dict[str, str]) -> dict[str, str]:
        for token, tenant in value.items():
            if not token:
                raise ValueError("an ingest token must not be empty")
            names.check_tenant(tenant)
        return value

    @pydantic.field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return transports.validate_url(value)

    @pydantic.field_validator("app", mode="before")
    @classmethod
    def _split_app(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @pydantic.field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: flags, then environment, then pyproject.toml.
        return (init_settings, env_settings, PyprojectTomlConfigSettingsSource(settings_cls, Path("pyproject.toml")))


def load(**overrides: Any) -> Settings:
    """Load settings, with ``overrides`` (CLI flags; ``None`` values ignored) on top.

    Raises:
        ConfigurationError: a setting is invalid; the message names it as an
            environment variable and says what is wrong.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"{ENV_PREFIX}{field.upper()} ({field}): {error['msg']}")
        raise errors.ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
    except errors.ConfigurationError as exc:
        raise errors.ConfigurationError(f"invalid configuration: {exc}") from None
