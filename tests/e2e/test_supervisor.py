"""``conveyor worker --processes N``: children are started, restarted when they die, drained on SIGTERM."""

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import httpx
from cli import Process, free_port_block, migrated


def child_pids(process: Process) -> list[int]:
    return [int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", process.text())]


def test_supervisor_restarts_a_dead_worker_and_drains_all_on_sigterm(tmp_path: Path) -> None:
    port = free_port_block(3)  # the supervisor, and its children on port + 1 and port + 2
    process = Process(["worker", "--processes", "2", "--port", str(port)], tmp_path / "sup.log", **migrated(tmp_path))
    try:
        process.wait_ready(port)
        version = httpx.get(f"http://127.0.0.1:{port}/version").json()
        assert (version["broker"], version["database"]) == ("memory", "sqlite"), version
        first, _second = child_pids(process)
        os.kill(first, signal.SIGKILL)
        process.wait_for_log("exited with -9; restarting")
        deadline = time.monotonic() + 20
        while len(child_pids(process)) < 3:
            assert time.monotonic() < deadline, f"no replacement worker started after 20s:\n{process.text()}"
            time.sleep(0.1)
        process.wait_ready(port)
        assert httpx.get(f"http://127.0.0.1:{port + 1}/readyz").status_code == 200
        assert process.terminate() == 0
        assert process.text().count("conveyor: stopped") == 2
        assert "all workers stopped" in process.text()
    finally:
        process.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is not running
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    port = free_port_block(3)
    process = Process(["worker", "--processes", "2", "--port", str(port)], tmp_path / "sup.log", **migrated(tmp_path))
    try:
        process.wait_ready(port)
        children = child_pids(process)
        process.popen.kill()  # kill -9: no drain, no signal to the children
        process.popen.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"orphaned workers still running 15s later:\n{process.text()}"
            time.sleep(0.2)
        assert process.text().count("conveyor: stopped") == 2  # each drained and stopped on its own
    finally:
        for pid in child_pids(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.close()
