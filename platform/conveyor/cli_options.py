"""Options, settings loading and exit codes shared by every ``conveyor`` command.

Exit codes: 0 success, 1 runtime error (a broker or database failed), 2 usage
or configuration error (the message names the setting or flag to fix).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from conveyor import errors, logs, settings

F = TypeVar("F", bound=Callable[..., Any])


def common(func: F) -> F:
    """Options every command takes; each overrides its ``CONVEYOR_*`` setting."""
    options = [
        click.option("--broker-url", help="Broker URL (CONVEYOR_BROKER_URL), e.g. nats://127.0.0.1:4222."),
        click.option("--app", "app_modules", help="Comma-separated modules to load (CONVEYOR_APP)."),
        click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR (CONVEYOR_LOG_LEVEL)."),
        click.option(
            "--log-format", type=click.Choice(["text", "json"]), help="Log line format (CONVEYOR_LOG_FORMAT)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def http_options(func: F) -> F:
    """``--host`` and ``--port`` of the process's HTTP server."""
    func = click.option("--port", type=int, help="HTTP port (CONVEYOR_HTTP_PORT); 0 turns HTTP off.")(func)
    return click.option("--host", help="HTTP address (CONVEYOR_HTTP_HOST).")(func)


def load(**flags: Any) -> settings.Settings:
    """Settings from the command's flags (over ``CONVEYOR_*`` and pyproject), with logging configured.

    Raises:
        ConfigurationError: a setting is invalid; the message names it.
    """
    config = settings.load(
        broker_url=flags.get("broker_url"),
        database_url=flags.get("database_url"),
        app=flags.get("app_modules"),
        log_level=flags.get("log_level"),
        log_format=flags.get("log_format"),
        http_host=flags.get("host"),
        http_port=flags.get("port"),
        concurrency=flags.get("concurrency"),
    )
    logs.configure(config.log_level, config.log_format)
    return config


def exits(func: F) -> F:
    """Turn Conveyor errors into messages and exit codes 2 (configuration) or 1 (runtime)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.ConfigurationError as exc:
            click.echo(f"conveyor: configuration error: {exc}", err=True)
            sys.exit(2)
        except errors.NotFound as exc:
            click.echo(f"conveyor: {exc}", err=True)
            sys.exit(2)
        except errors.ConveyorError as exc:
            click.echo(f"conveyor: error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
