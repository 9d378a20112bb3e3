"""The Procfile under honcho, as an operator runs it: web, worker, relay and scheduler cooperate."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
from cli import ROOT, clean_env, migrated
from conveyor.testing import unique

APP = """
import os
from datetime import timedelta
from pathlib import Path

from conveyor import Context, every, on


@on(os.environ["PROC_TOPIC"], name=os.environ["PROC_HANDLER"])
def record(event: dict, ctx: Context) -> None:
    with (Path(os.environ["PROC_DIR"]) / "handled.txt").open("a") as out:
        out.write(event["n"] + "\\n")


@every(timedelta(seconds=1), name=os.environ["PROC_SCHEDULE"])
def tick(ctx: Context) -> None:
    (Path(os.environ["PROC_DIR"]) / "ticked.txt").write_text("yes")
"""
TYPES = ("web", "worker", "relay", "scheduler")


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def free_base() -> int:
    """A base port for honcho (``-p``) whose four process ports (base, +100, +200, +300) are free on every interface.

    Drawn below the kernel's ephemeral range (32768 and up), where client sockets of other tests
    running at the same time take their ports, and checked by binding each port.
    """
    for _ in range(50):
        base = random.randrange(10_000, 32_000, 1000)
        try:
            for offset in range(0, 100 * len(TYPES), 100):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", base + offset))
        except OSError:
            continue
        return base
    raise AssertionError("no free base port for honcho's four processes in 50 tries")


def test_procfile_process_types_run_together_under_honcho(rabbit_url: str, tmp_path: Path) -> None:
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    (tmp_path / "procapp.py").write_text(APP)
    base = free_base()
    topic = unique("proc")
    env = clean_env(
        CONVEYOR_BROKER_URL=rabbit_url, CONVEYOR_APP="procapp", CONVEYOR_APP_DIR=str(tmp_path),
        PROC_TOPIC=topic, PROC_HANDLER=unique("proc"), PROC_SCHEDULE=unique("proc"), PROC_DIR=str(tmp_path),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **migrated(tmp_path),
    )  # fmt: skip
    log = (tmp_path / "honcho.log").open("wb")
    honcho = subprocess.Popen(
        [str(Path(sys.executable).parent / "honcho"), "start", "-f", "Procfile", "-p", str(base)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    ports = dict(zip(TYPES, (base + 100 * i for i in range(len(TYPES))), strict=True))
    try:
        deadline = time.monotonic() + 60
        while not all(ready(port) for port in ports.values()):
            assert honcho.poll() is None and time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()
            time.sleep(0.2)
        event = {"specversion": "1.0", "id": unique("e"), "source": "t", "type": topic, "data": {"n": "1"}}
        response = httpx.post(
            f"http://127.0.0.1:{ports['web']}/events/{topic}", content=orjson.dumps(event),
            headers={"content-type": "application/cloudevents+json"},
        )  # fmt: skip
        assert response.status_code == 202
        while not ((tmp_path / "handled.txt").exists() and (tmp_path / "ticked.txt").exists()):
            assert time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()
            time.sleep(0.2)
    finally:
        honcho.send_signal(signal.SIGTERM)  # honcho passes it on to every process
        honcho.wait(30)  # honcho itself reports 143 for SIGTERM; what counts is each process's code
        log.close()
    output = (tmp_path / "honcho.log").read_text()
    assert (tmp_path / "handled.txt").read_text().split() == ["1"]
    assert all(f"{kind}.1 stopped (rc=0)" in output for kind in TYPES), output
