"""``conveyor db``: create or migrate the service's tables, and see which migrations a database has.

The verbs are Alembic's: ``upgrade`` (to the newest revision), ``current``
(the revision the database is at) and ``history`` (every migration, and which
are applied).
"""

from __future__ import annotations

import asyncio
from typing import Any

import click
import orjson

from conveyor import cli_options, schedules_cli
from conveyor.runtime import app


@click.group()
def db() -> None:
    """The service's database: create or migrate its tables (upgrade), see its revision (current, history)."""


def _options(func: cli_options.F) -> cli_options.F:
    func = cli_options.database(func)
    func = click.option(
        "--log-level", type=click.Choice(cli_options.LOG_LEVELS, case_sensitive=False), help="(CONVEYOR_LOG_LEVEL)."
    )(func)
    return cli_options.exits(func)


@db.command()
@_options
def upgrade(**flags: Any) -> None:
    """Create or migrate the database's tables (events, outbox, inbox, schedules, sagas) to the newest revision.

    Prints what it did: the tables it created and the revisions before and after,
    or that the database was already at the newest revision.
    """
    config = cli_options.load(**flags)
    done = asyncio.run(app.upgrade_database(config.database_url))
    click.echo(done.describe(app.redact(config.database_url)))


@db.command()
@_options
def current(**flags: Any) -> None:
    """Print the revision the database is at, and whether it is the newest (opens the database, changes nothing)."""
    config = cli_options.load(**flags)
    revisions = asyncio.run(app.database_history(config.database_url))
    newest = revisions[-1].revision
    at = next((r.revision for r in revisions if r.current), None)
    if at == newest:
        click.echo(f"{at} (the newest)")
    elif at is None:
        click.echo(f"none (never migrated; `conveyor db upgrade` creates the tables at {newest})")
    else:
        click.echo(f"{at} (behind: the newest is {newest}; run `conveyor db upgrade`)")


@db.command()
@_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per migration.")
def history(as_json: bool, **flags: Any) -> None:
    """List every migration, oldest first, and whether the database has it.

    \b
    Columns:
      REVISION     the migration's id; "(current)" marks the database's revision
      APPLIED      yes if the database has it, no if `conveyor db upgrade` would apply it
      DESCRIPTION  what it changes
    """
    config = cli_options.load(**flags)
    revisions = asyncio.run(app.database_history(config.database_url))
    if as_json:
        rows = [
            {"revision": r.revision, "description": r.description, "applied": r.applied, "current": r.current}
            for r in revisions
        ]
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    table = [("REVISION", "APPLIED", "DESCRIPTION")]
    for r in revisions:
        table.append((r.revision + (" (current)" if r.current else ""), "yes" if r.applied else "no", r.description))
    schedules_cli.print_table(table)
