"""The embedded default runs on the base install: no broker or PostgreSQL driver is imported unless used."""

import subprocess
import sys

EXTRAS = ("asyncpg", "psycopg", "aiokafka", "aio_pika", "nats", "eventsourcing", "faststream")
PROBE = f"""
import sys
for name in {EXTRAS!r}:
    sys.modules[name] = None  # importing it now raises ImportError
import conveyor, conveyor.cli, conveyor.runtime.app, event_store
from conveyor import transports
transports.create("memory://")
print("ok")
"""


def test_the_base_install_needs_no_optional_driver() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


def test_a_missing_driver_is_a_configuration_error_naming_the_extra() -> None:
    probe = PROBE.replace('transports.create("memory://")', 'transports.create("nats://127.0.0.1:4222")')
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert "pip install 'conveyor[nats]'" in result.stderr, result.stderr
