"""``conveyor schedules list|pause|resume|trigger`` from the command line, seen by a running scheduler replica."""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from cli import Process, migrated, run
from conveyor.testing import unique

APP = """
import os
from datetime import timedelta

from conveyor import every


@every(timedelta(seconds=1), name=os.environ["CLI_SCHEDULE"])
def tick() -> None: ...
"""


def claims(db: Path, name: str, who: str | None = None) -> int:
    with sqlite3.connect(db) as connection:
        sql, args = "SELECT count(*) FROM schedule_claims WHERE schedule = ?", [name]
        if who is not None:
            sql, args = sql + " AND claimed_by = ?", [name, who]
        return int(connection.execute(sql, args).fetchone()[0])


def fire_times(db: Path, name: str) -> list[datetime]:
    """Fire times claimed for the schedule (UTC, naive)."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT fire_time FROM schedule_claims WHERE schedule = ?", [name]).fetchall()
    return sorted(datetime.fromisoformat(str(row[0])[:19]) for row in rows)


def wait_for_claims(db: Path, name: str, at_least: int, replica: Process) -> None:
    deadline = time.monotonic() + 20
    while (count := claims(db, name)) < at_least:
        assert replica.popen.poll() is None, f"the replica exited:\n{replica.text()}"
        assert time.monotonic() < deadline, f"{count} of {at_least} claims after 20s:\n{replica.text()}"
        time.sleep(0.1)


def test_pause_resume_and_trigger_from_the_cli_reach_a_running_replica(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(APP)
    name = unique("cli")
    env = {"CONVEYOR_APP": "cliapp", "CONVEYOR_APP_DIR": str(tmp_path), "CLI_SCHEDULE": name, **migrated(tmp_path)}
    db = tmp_path / "conveyor.db"
    replica = Process(["scheduler", "--port", "0"], tmp_path / "scheduler.log", cwd=tmp_path, **env)
    try:
        wait_for_claims(db, name, 2, replica)
        before = claims(db, name)
        assert run(["schedules", "pause", name], cwd=tmp_path, **env).returncode == 0
        # A tick under way when the pause landed may still claim a fire, but none after this moment.
        paused = datetime.now(UTC).replace(tzinfo=None)
        # A negative check, so a sleep: two fire times pass while paused, with time for the tick after each.
        time.sleep((paused.replace(microsecond=0) + timedelta(seconds=2.3) - paused).total_seconds())
        late = [fire for fire in fire_times(db, name) if fire > paused]
        assert not late, f"the replica kept firing a paused schedule: {late}"
        paused_at = claims(db, name)
        assert paused_at <= before + 1, f"{paused_at - before} fires claimed after the pause"
        listing = run(["schedules"], cwd=tmp_path, **env)
        assert name in listing.stdout and "paused" in listing.stdout, listing.stdout + listing.stderr
        assert run(["schedules", "resume", name], cwd=tmp_path, **env).returncode == 0
        wait_for_claims(db, name, paused_at + 2, replica)
        triggered = run(["schedules", "trigger", name], cwd=tmp_path, **env)
        assert triggered.returncode == 0, triggered.stderr
        assert claims(db, name, who="manual") == 1
        unknown = run(["schedules", "trigger", "no.such.schedule"], cwd=tmp_path, **env)
        assert (unknown.returncode, "no schedule named" in unknown.stderr) == (2, True)
        assert replica.terminate() == 0
    finally:
        replica.close()


def test_schedules_list_prints_json_and_bare_schedules_stays_its_alias(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(APP)
    name = unique("cli")
    env = {"CONVEYOR_APP": "cliapp", "CONVEYOR_APP_DIR": str(tmp_path), "CLI_SCHEDULE": name, **migrated(tmp_path)}
    listed = run(["schedules", "list", "--json"], cwd=tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    [entry] = orjson.loads(listed.stdout)
    assert (entry["name"], entry["state"], entry["last_run"], len(entry["next_fires"])) == (name, "active", None, 3)
    table = run(["schedules", "list"], cwd=tmp_path, **env)
    bare = run(["schedules"], cwd=tmp_path, **env)
    assert table.returncode == bare.returncode == 0, table.stderr + bare.stderr
    header = ["NAME", "EXPRESSION", "TZ"]
    assert table.stdout.splitlines()[0].split()[:3] == bare.stdout.splitlines()[0].split()[:3] == header
    assert name in table.stdout and name in bare.stdout


def test_schedules_commands_take_database_url_after_the_verb(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(APP)
    name = unique("cli")
    env = {"CONVEYOR_APP": "cliapp", "CONVEYOR_APP_DIR": str(tmp_path), "CLI_SCHEDULE": name}
    url = migrated(tmp_path)["CONVEYOR_DATABASE_URL"]  # given as a flag only: the environment has none
    paused = run(["schedules", "pause", name, "--database-url", url], cwd=tmp_path, **env)
    assert paused.returncode == 0, paused.stderr
    triggered = run(["schedules", "trigger", name, "--database-url", url], cwd=tmp_path, **env)
    assert triggered.returncode == 0, triggered.stderr
    assert claims(tmp_path / "conveyor.db", name, who="manual") == 1
    [entry] = orjson.loads(run(["schedules", "list", "--json", "--database-url", url], cwd=tmp_path, **env).stdout)
    assert (entry["state"], entry["last_run"]["status"]) == ("paused", "claimed")


def test_schedules_list_help_explains_its_columns() -> None:
    result = run(["schedules", "list", "--help"])
    explained = result.stdout.split("Columns:", 1)[-1]
    for column in ("NEXT FIRES (UTC)", "LAST RUN", "STATE"):
        assert re.search(rf"\n +{re.escape(column)} ", explained), result.stdout
