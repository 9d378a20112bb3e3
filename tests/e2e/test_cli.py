"""The CLI end to end: the embedded default, ingest, drain on SIGTERM, exit codes."""

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from cli import ROOT, Process, clean_env, free_port, migrated, run

from event_store import models

ORDER = {
    "specversion": "1.0",
    "id": "o-1",
    "source": "shop",
    "type": "orders.placed",
    "data": {"order_id": "o-1", "customer": "ada@example.com", "total_cents": 4200},
}
STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def embedded(tmp_path: Path, port: int) -> Iterator[Process]:
    process = Process(["run", "--port", str(port)], tmp_path / "run.log", **migrated(tmp_path))
    try:
        process.wait_ready(port)
        yield process
    finally:
        process.close()


def test_run_handles_a_posted_event_through_the_example_flow(embedded: Process, port: int) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{port}/events/orders.placed", content=orjson.dumps(ORDER), headers=STRUCTURED
    )
    assert response.status_code == 202
    embedded.wait_for_log("charged o-1: 4200 cents")
    embedded.wait_for_log("emailed ada@example.com")


def test_run_dead_letters_an_invalid_order_and_keeps_running(embedded: Process, port: int) -> None:
    bad = {**ORDER, "id": "o-2", "data": {"order_id": "o-2", "customer": "bob@example.com", "total_cents": 0}}
    url = f"http://127.0.0.1:{port}/events/orders.placed"
    assert httpx.post(url, content=orjson.dumps(bad), headers=STRUCTURED).status_code == 202
    embedded.wait_for_log("dead-lettered a message to orders.placed.dlq")
    assert httpx.post(url, content=orjson.dumps(ORDER), headers=STRUCTURED).status_code == 202
    embedded.wait_for_log("charged o-1")


def test_sigterm_exits_zero(embedded: Process) -> None:
    assert embedded.terminate() == 0
    assert "stopped" in embedded.text()


SLOW_APP = """
import asyncio, logging
from conveyor import on

@on("jobs", name="slow.job")
async def slow(job: dict) -> None:
    logging.getLogger("app").info("started %s", job["n"])
    await asyncio.sleep(1.5)
    logging.getLogger("app").info("finished %s", job["n"])
"""


def test_sigterm_drains_in_flight_work_before_exiting(tmp_path: Path, port: int) -> None:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    process = Process(
        ["run", "--port", str(port), "--app", "slowapp"], tmp_path / "run.log", cwd=tmp_path, **migrated(tmp_path)
    )
    try:
        process.wait_ready(port)
        event = {"specversion": "1.0", "id": "j-1", "source": "t", "type": "jobs", "data": {"n": 1}}
        httpx.post(f"http://127.0.0.1:{port}/events/jobs", content=orjson.dumps(event), headers=STRUCTURED)
        process.wait_for_log("started 1")
        assert process.terminate() == 0
        assert "finished 1" in process.text()
    finally:
        process.close()


def test_bad_broker_url_exits_2_naming_the_setting() -> None:
    result = run(["run"], CONVEYOR_BROKER_URL="redis://localhost:6379")
    assert result.returncode == 2
    assert "CONVEYOR_BROKER_URL" in result.stderr


def test_unknown_app_module_exits_2_naming_it() -> None:
    result = run(["handlers", "--app", "no_such_module_here"])
    assert (result.returncode, "no_such_module_here" in result.stderr) == (2, True)


def test_port_in_use_exits_2(embedded: Process, port: int, tmp_path: Path) -> None:
    result = run(["run", "--port", str(port)], **migrated(_mkdir(tmp_path / "other")))
    assert (result.returncode, "cannot listen" in result.stderr) == (2, True)


def test_handlers_lists_the_example_application() -> None:
    result = run(["handlers"])
    assert result.returncode == 0, result.stderr
    assert "billing.charge-order" in result.stdout and "orders.placed" in result.stdout


def test_publish_to_memory_broker_explains_the_alternative() -> None:
    result = run(["publish", "orders.placed", "{}"])
    assert (result.returncode, "POST /events" in result.stderr) == (2, True)


def test_unmigrated_database_exits_2_naming_the_command(tmp_path: Path) -> None:
    result = run(["worker"], CONVEYOR_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    assert (result.returncode, "conveyor db upgrade" in result.stderr) == (2, True), result.stderr


def test_usage_error_exits_2() -> None:
    assert run(["worker", "--no-such-flag"]).returncode == 2


def test_json_log_format_writes_json_lines(tmp_path: Path, port: int) -> None:
    process = Process(["run", "--port", str(port), "--log-format", "json"], tmp_path / "run.log", **migrated(tmp_path))
    try:
        process.wait_ready(port)
    finally:
        process.terminate()
    lines = [orjson.loads(line) for line in process.text().splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("service conveyor ready") for line in lines)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_the_same_order_placed_twice_is_checked_out_once(embedded: Process, port: int) -> None:
    url = f"http://127.0.0.1:{port}/events/orders.placed"
    assert httpx.post(url, content=orjson.dumps(ORDER), headers=STRUCTURED).status_code == 202
    embedded.wait_for_log("saga shop.checkout o-1: completed")
    again = {**ORDER, "id": "o-1-again"}
    assert httpx.post(url, content=orjson.dumps(again), headers=STRUCTURED).status_code == 202
    embedded.wait_for_log("saga shop.checkout o-1 already started")
    assert embedded.text().count("charged o-1") == 1


def test_a_declined_payment_releases_the_reserved_stock(embedded: Process, port: int) -> None:
    big = {**ORDER, "id": "o-9", "data": {"order_id": "o-9", "customer": "eve@example.com", "total_cents": 90_000}}
    url = f"http://127.0.0.1:{port}/events/orders.placed"
    assert httpx.post(url, content=orjson.dumps(big), headers=STRUCTURED).status_code == 202
    embedded.wait_for_log("saga shop.checkout o-9: compensated")
    log = embedded.text()
    assert log.index("reserved 1 item(s) for o-9") < log.index("declined o-9") < log.index("released 1 item(s) of o-9")
    assert "charged o-9" not in log


HUNG_APP = """
import logging, time
from conveyor import on

@on("jobs", name="hung.job", timeout=0.5)
def hangs(job: dict) -> None:
    logging.getLogger("app").info("started %s", job["n"])
    time.sleep(30)
"""


def test_sigterm_exits_by_the_drain_deadline_even_with_a_hung_sync_handler(tmp_path: Path, port: int) -> None:
    (tmp_path / "hungapp.py").write_text(HUNG_APP)
    env = {**migrated(tmp_path), "CONVEYOR_DRAIN_TIMEOUT": "0.5"}
    process = Process(["run", "--port", str(port), "--app", "hungapp"], tmp_path / "run.log", cwd=tmp_path, **env)
    try:
        process.wait_ready(port)
        event = {"specversion": "1.0", "id": "j-1", "source": "t", "type": "jobs", "data": {"n": 1}}
        httpx.post(f"http://127.0.0.1:{port}/events/jobs", content=orjson.dumps(event), headers=STRUCTURED)
        process.wait_for_log("started 1")
        started = time.monotonic()
        assert process.terminate() == 0
        assert time.monotonic() - started < 5, "the process waited for the hung thread"
    finally:
        process.close()


def test_run_in_an_empty_directory_migrates_its_own_database(tmp_path: Path, port: int) -> None:
    process = Process(["run", "--port", str(port)], tmp_path / "run.log", cwd=tmp_path, CONVEYOR_APP_DIR=str(ROOT))
    try:
        process.wait_ready(port)
        assert (tmp_path / "conveyor.db").exists()
        assert httpx.get(f"http://127.0.0.1:{port}/version").json()["database"] == "sqlite"
    finally:
        assert process.terminate() == 0, process.text()


def test_production_process_types_refuse_an_unmigrated_database(tmp_path: Path) -> None:
    result = run(["worker", "--port", "0"], cwd=tmp_path, CONVEYOR_APP_DIR=str(ROOT))
    assert result.returncode == 2
    assert "conveyor db upgrade" in result.stderr


def test_publish_and_handlers_need_no_database(tmp_path: Path) -> None:
    listed = run(
        ["handlers"],
        cwd=tmp_path,
        CONVEYOR_APP_DIR=str(ROOT),
        CONVEYOR_DATABASE_URL="postgresql+asyncpg://nobody@127.0.0.1:1/none",
    )
    assert listed.returncode == 0, listed.stderr
    assert "billing.charge-order" in listed.stdout


def test_log_level_flag_rejects_an_unknown_level_naming_the_flag() -> None:
    result = run(["handlers", "--log-level", "loud"])
    assert result.returncode == 2
    assert "'--log-level'" in result.stderr and "'loud' is not one of" in result.stderr, result.stderr
    assert run(["handlers", "--log-level", "warning"]).returncode == 0


@pytest.mark.parametrize("command", ["worker", "relay", "scheduler", "serve"])
def test_process_commands_take_database_url_over_the_environment(tmp_path: Path, command: str) -> None:
    flagged = tmp_path / "flagged.db"
    result = run(
        [command, "--port", "0", "--database-url", f"sqlite+aiosqlite:///{flagged}"],
        CONVEYOR_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/from-env.db",
    )
    assert result.returncode == 2  # unmigrated: the database the flag names, not the environment's
    assert str(flagged) in result.stderr and "conveyor db upgrade" in result.stderr, result.stderr


def test_run_takes_database_url(tmp_path: Path, port: int) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/flagged.db"
    process = Process(["run", "--port", str(port), "--database-url", url], tmp_path / "run.log")
    try:
        process.wait_ready(port)
        assert (tmp_path / "flagged.db").exists()
    finally:
        assert process.terminate() == 0, process.text()


def test_handlers_prints_json_and_explains_its_columns() -> None:
    result = run(["handlers", "--json"])
    assert result.returncode == 0, result.stderr
    listed = {entry["name"]: entry for entry in orjson.loads(result.stdout)}
    assert listed["billing.charge-order"]["topic"] == "billing.charge"
    assert {"attempts", "timeout_seconds", "concurrency", "function"} <= set(listed["billing.charge-order"])
    explained = run(["handlers", "--help"]).stdout.split("Columns:", 1)[-1]
    for column in ("ATTEMPTS", "TIMEOUT", "CONCURRENCY"):
        assert re.search(rf"\n +{column} ", explained), explained


def test_db_upgrade_on_an_empty_database_says_what_it_created(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/new.db"
    created = run(["db", "upgrade", "--database-url", url])
    assert created.returncode == 0, created.stderr
    tables = len(models.metadata.tables) + 1  # and Alembic's conveyor_alembic_version
    assert f"created {tables} table(s): " in created.stdout and "outbox" in created.stdout, created.stdout
    assert "now at revision" in created.stdout
    again = run(["db", "upgrade", "--database-url", url])
    assert "already at revision" in again.stdout and "nothing to do" in again.stdout, again.stdout


def test_db_current_and_history_show_the_revision_of_the_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/new.db"
    before = run(["db", "current", "--database-url", url])
    assert (before.returncode, before.stdout.split()[0]) == (0, "none"), before.stderr
    assert "conveyor db upgrade" in before.stdout
    pending = orjson.loads(run(["db", "history", "--json", "--database-url", url]).stdout)
    assert pending and not any(r["applied"] or r["current"] for r in pending)
    assert run(["db", "upgrade", "--database-url", url]).returncode == 0
    newest = pending[-1]["revision"]
    assert run(["db", "current", "--database-url", url]).stdout.strip() == f"{newest} (the newest)"
    applied = orjson.loads(run(["db", "history", "--json", "--database-url", url]).stdout)
    assert all(r["applied"] for r in applied) and [r["revision"] for r in applied if r["current"]] == [newest]
    table = run(["db", "history", "--database-url", url]).stdout.splitlines()
    assert table[0].split() == ["REVISION", "APPLIED", "DESCRIPTION"]
    assert table[-1].startswith(f"{newest} (current)")


README = ROOT / "README.md"
_LONG_RUNNING = re.compile(r"conveyor (run|worker|relay|scheduler|serve)\b")


def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_readme_set_up_commands_work_as_written_in_a_new_terminal(tmp_path: Path) -> None:
    """The Set up section's `conveyor` commands (in its sh blocks and inline) run in one fresh shell.

    A fresh terminal has no .venv on its PATH; the section's own activation line, if it has one, runs first.
    """
    section = _readme_section("Set up")
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    activate = [line for line in lines if re.fullmatch(r"(\.|source) \.venv/bin/activate", line)]
    spans = [*lines, *re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", section, flags=re.DOTALL))]
    conveyor = [c for c in spans if re.match(r"(\.venv/bin/)?conveyor ", c) and not _LONG_RUNNING.match(c)]
    commands = [*activate, *dict.fromkeys(conveyor)]
    assert any("conveyor sagas list" in command for command in commands), commands
    venv_bin = str(ROOT / ".venv" / "bin")
    path = os.pathsep.join(part for part in os.environ["PATH"].split(os.pathsep) if part != venv_bin)
    env = {**clean_env(**migrated(tmp_path)), "PATH": path}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(commands)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{commands}\n{result.stdout}{result.stderr}"


def test_readme_set_up_says_what_the_demo_log_shows() -> None:
    section = " ".join(_readme_section("Set up").split())
    assert "every fourth" in section and "every fifth order" in section
    for shown in ("WARNING", "declined", "over the card limit", "compensat", "releas"):
        assert shown in section, shown
