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

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""The levels ``--log-level`` and ``CONVEYOR_LOG_LEVEL`` accept (any case)."""

CONSOLE_URL = "http://127.0.0.1:8000/console"
"""Where ``conveyor run`` serves the operations console by default."""


def common(func: F) -> F:
    """Options every command takes; each overrides its ``CONVEYOR_*`` setting."""
    options = [
        click.option("--broker-url", help="Broker URL (CONVEYOR_BROKER_URL), e.g. nats://127.0.0.1:4222."),
        click.option("--app", "app_modules", help="Comma-separated modules to load (CONVEYOR_APP)."),
        click.option(
            "--log-level",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            help="Log level (CONVEYOR_LOG_LEVEL).",
        ),
        click.option(
            "--log-format", type=click.Choice(["text", "json"]), help="Log line format (CONVEYOR_LOG_FORMAT)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def database(func: F) -> F:
    """``--database-url``, for every command that opens the service's database."""
    return click.option("--database-url", help="SQLAlchemy async URL (CONVEYOR_DATABASE_URL).")(func)


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


def refuse_memory_broker(config: settings.Settings, what: str, console_page: str, endpoint: str = "") -> None:
    """Stop a command that needs the broker from another process when the broker is ``memory://``.

    The in-memory broker lives inside the ``conveyor run`` process that created
    it; a command in another process would see an empty one of its own.

    Args:
        config: the command's settings.
        what: what the command would have shown, e.g. "each handler's backlog".
        console_page: the console page that shows it, e.g. "/console/dead-letters".
        endpoint: an HTTP endpoint of the process that answers the same in JSON, if any.

    Raises:
        ConfigurationError: the broker is ``memory://``; the message says where to look instead.
    """
    if not config.broker_url.startswith("memory:"):
        return
    page = CONSOLE_URL.removesuffix("/console") + console_page
    as_json = f"; for scripts, {endpoint} of that process" if endpoint else ""
    raise errors.ConfigurationError(
        f"the memory:// broker lives inside the `conveyor run` process, so {what} cannot be read from "
        f"another process: open the console of that process, {page} (on its --port){as_json}; or give "
        "--broker-url (CONVEYOR_BROKER_URL) a real broker"
    )


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
