"""Running the ``conveyor`` command as an operator does: a subprocess with logs in a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CONVEYOR = [sys.executable, "-m", "conveyor.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int) -> int:
    """A port ``p`` such that ``p`` .. ``p + count - 1`` are all free now (``--processes`` children use port + i)."""
    for _ in range(200):
        first = free_port()
        sockets = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise RuntimeError(f"no block of {count} free ports found")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(extra)
    return env


class Process:
    """A running ``conveyor`` command whose stderr goes to a log file."""

    def __init__(self, args: list[str], log: Path, cwd: Path = ROOT, **env: str) -> None:
        self.log = log
        self._file = log.open("wb")
        self.popen = subprocess.Popen(
            [*CONVEYOR, *args], cwd=cwd, env=clean_env(**env), stdout=self._file, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before logging {needle!r}:\n{self.text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in the log after {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def wait_ready(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited ({self.popen.returncode}):\n{self.text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready after {timeout}s:\n{self.text()}")
            time.sleep(0.1)

    def terminate(self, timeout: float = 20) -> int:
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._file.close()


def migrated(directory: Path) -> dict[str, str]:
    """Environment naming a fresh, migrated SQLite database in ``directory``."""
    url = f"sqlite+aiosqlite:///{directory}/conveyor.db"
    result = run(["db", "upgrade"], CONVEYOR_DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    return {"CONVEYOR_DATABASE_URL": url}


def run(args: list[str], cwd: Path = ROOT, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a short ``conveyor`` command to completion."""
    return subprocess.run(
        [*CONVEYOR, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )
