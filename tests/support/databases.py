"""Fresh migrated databases for tests and benchmarks (importable by unittest-style cases too).

Migrations run once per test session into a template (a PostgreSQL template
database, a SQLite file); each test gets a clone (``CREATE DATABASE ...
TEMPLATE``, a file copy) and drops it afterwards, after checking that no
connection to it is left open.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from event_store import database, migrate

PG_URL = os.environ.get("CONVEYOR_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

_state: dict[str, str] = {}


def _tmpdir() -> Path:
    """This session's directory of SQLite files, made on first use (importing this module makes nothing)."""
    if "tmpdir" not in _state:
        _state["tmpdir"] = tempfile.mkdtemp(prefix="conveyor-es-")
    return Path(_state["tmpdir"])


def _admin_dsn() -> str:
    return make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_url(name: str) -> str:
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def _admin(sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(_admin_dsn(), autocommit=True) as connection:
        cursor = connection.execute(sql)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def _migrate_sync(url: str) -> None:
    engine = sa.create_engine(database.normalize_url(url, sync=True))
    if engine.dialect.name == "sqlite":
        database.configure_sqlite(engine, 10.0)
    try:
        with engine.connect() as connection:
            migrate.upgrade_connection(connection)
            connection.commit()
    finally:
        engine.dispose()  # the last close checkpoints SQLite's WAL into the file


def pg_template() -> str:
    """The name of this session's migrated PostgreSQL template database."""
    if "pg" not in _state:
        name = f"conveyor_tmpl_{uuid.uuid4().hex[:12]}"
        _admin(f'CREATE DATABASE "{name}"')
        _migrate_sync(_pg_url(name))
        _state["pg"] = name
    return _state["pg"]


def sqlite_template() -> Path:
    """This session's migrated SQLite file."""
    if "sqlite" not in _state:
        path = _tmpdir() / "template.db"
        _migrate_sync(f"sqlite:///{path}")
        _state["sqlite"] = str(path)
    return Path(_state["sqlite"])


def create(kind: str) -> str:
    """A fresh migrated database of ``kind`` ("sqlite" or "postgres"); return its async URL."""
    if kind == "sqlite":
        path = _tmpdir() / f"{uuid.uuid4().hex[:12]}.db"
        shutil.copyfile(sqlite_template(), path)
        return f"sqlite+aiosqlite:///{path}"
    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template()}"')
    return _pg_url(name)


def create_empty(kind: str) -> str:
    """A fresh database with no tables; return its async URL."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{_tmpdir() / uuid.uuid4().hex[:12]}.db"
    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    return _pg_url(name)


def open_connections(url: str, settle: float = 3.0) -> int:
    """Connections still open to the database of ``url`` (PostgreSQL; 0 for SQLite).

    A backend leaves ``pg_stat_activity`` shortly after its client closed the
    connection, so this waits up to ``settle`` seconds for the count to reach 0.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return 0
    deadline = time.monotonic() + settle
    while True:
        rows = _admin(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{parsed.database}'")
        count = int(rows[0][0])  # type: ignore[call-overload]
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def drop(url: str) -> None:
    """Drop a database made by :func:`create` (forcibly: the leak check comes first)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        _admin(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        return
    for suffix in ("", "-wal", "-shm"):
        Path(f"{parsed.database}{suffix}").unlink(missing_ok=True)


def drop_templates() -> None:
    """Drop this session's templates."""
    if "pg" in _state:
        _admin(f'DROP DATABASE IF EXISTS "{_state.pop("pg")}" WITH (FORCE)')
    _state.pop("sqlite", None)  # it lives in the directory below
    if "tmpdir" in _state:
        shutil.rmtree(_state.pop("tmpdir"), ignore_errors=True)
