"""Checks of compose/docker-compose.yml, compose/start-local-services.sh, the Makefile and compose/kubernetes/.

Nothing here needs Docker, Kubernetes or a running service: the compose file and the
Kubernetes manifests are parsed with PyYAML; the start script runs against fake service
commands (on ``PATH``, recording their calls) and ports of this test's own: a closed one, or
a silent listener that accepts TCP and never answers (a wedged RabbitMQ node).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
START_SCRIPT = ROOT / "compose" / "start-local-services.sh"
SERVICES = ("kafka", "rabbitmq", "nats", "postgres")
KUBERNETES = ROOT / "compose" / "kubernetes"
PROCFILE = ROOT / "Procfile"
MAKEFILE = ROOT / "Makefile"
SERVICE_COMMANDS = ("rabbitmqctl", "rabbitmq-server", "pg_ctlcluster", "start-stop-daemon", "systemctl", "docker")


def _services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    services: dict[str, Any] = document["services"]
    return services


def _published_ports(service: dict[str, Any]) -> set[int]:
    """Host ports of a service, from short ("9092:9092") or long ({published: 9092}) syntax."""
    ports: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["published"]))
        else:
            parts = str(entry).split("/")[0].split(":")
            ports.add(int(parts[-2]) if len(parts) >= 2 else int(parts[0]))
    return ports


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(str(item).split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def test_the_four_services_exist() -> None:
    assert set(SERVICES) <= set(_services())


@pytest.mark.parametrize(
    ("service", "port"),
    [("kafka", 9092), ("rabbitmq", 5672), ("nats", 4222), ("postgres", 5432)],
)
def test_service_publishes_its_port(service: str, port: int) -> None:
    assert port in _published_ports(_services()[service])


def test_nats_enables_jetstream() -> None:
    nats = _services()["nats"]
    assert str(nats["image"]).startswith("nats:2")
    assert {"-js", "--jetstream"} & set(_command(nats))


def test_kafka_runs_in_kraft_mode() -> None:
    kafka = _services()["kafka"]
    environment = _environment(kafka)
    assert str(kafka["image"]).startswith("apache/kafka")
    roles = {role.strip() for role in environment["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in environment
    assert "localhost:9092" in environment["KAFKA_ADVERTISED_LISTENERS"]


def test_postgres_trusts_local_users_and_creates_test_database() -> None:
    environment = _environment(_services()["postgres"])
    assert environment["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert environment["POSTGRES_DB"] == "test"


@pytest.mark.parametrize("service", SERVICES)
def test_service_has_a_healthcheck(service: str) -> None:
    healthcheck = _services()[service].get("healthcheck")
    assert healthcheck, f"{service} has no healthcheck"
    assert healthcheck["test"], f"{service} healthcheck has no test command"


def test_start_script_is_valid_bash() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(START_SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_start_script_is_executable() -> None:
    assert START_SCRIPT.stat().st_mode & 0o111


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A port that accepts TCP (the kernel completes the handshake) and never sends a byte."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


def _fake_service_commands(tmp_path: Path) -> tuple[Path, Path]:
    """A bin directory of service commands that only append their command line to a file."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.touch()
    for name in SERVICE_COMMANDS:
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        fake.chmod(0o755)
    return bin_dir, calls


def _run_script(tmp_path: Path, bin_dir: Path, command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "WAIT_SECONDS": "2",
        "AMQP_TIMEOUT": "1",
        "CONVEYOR_SERVICES": "local",
        "RABBITMQ_PID_FILE": str(tmp_path / "no-such.pid"),
        **env,
    }
    return subprocess.run(
        ["bash", *command], capture_output=True, text=True, env=environment, timeout=120, check=False, cwd=ROOT
    )


def test_start_script_leaves_a_wedged_rabbitmq_running_and_fails_naming_the_fix(tmp_path: Path) -> None:
    bin_dir, calls = _fake_service_commands(tmp_path)
    with _silent_listener() as port:
        result = _run_script(tmp_path, bin_dir, ["-c", f'source "{START_SCRIPT}"; start_rabbitmq {port}'])
    assert result.returncode == 1, result.stdout + result.stderr
    assert calls.read_text() == "", f"the script ran service commands on a node it did not start:\n{calls.read_text()}"
    assert f"RabbitMQ is unhealthy: it accepts TCP on 127.0.0.1:{port}" in result.stderr
    assert "rabbitmqctl shutdown && sudo rabbitmq-server -detached" in result.stderr, result.stderr


def test_start_script_starts_a_rabbitmq_that_is_not_running(tmp_path: Path) -> None:
    bin_dir, calls = _fake_service_commands(tmp_path)
    port = _closed_port()
    result = _run_script(tmp_path, bin_dir, ["-c", f'source "{START_SCRIPT}"; start_rabbitmq {port}'])
    assert calls.read_text() == "rabbitmq-server -detached\n"
    assert result.returncode == 1  # the fake never listens: the wait names the start command
    assert "start command: rabbitmq-server -detached" in result.stderr


def test_start_script_check_starts_nothing_and_names_every_unhealthy_service(tmp_path: Path) -> None:
    bin_dir, calls = _fake_service_commands(tmp_path)
    postgres, nats = _closed_port(), _closed_port()
    with _silent_listener() as rabbit:
        result = _run_script(
            tmp_path,
            bin_dir,
            [str(START_SCRIPT), "--check"],
            POSTGRES_PORT=str(postgres),
            RABBITMQ_PORT=str(rabbit),
            NATS_PORT=str(nats),
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert calls.read_text() == ""
    assert f"PostgreSQL: nothing accepts connections on 127.0.0.1:{postgres}" in result.stderr, result.stderr
    assert f"RabbitMQ is unhealthy: it accepts TCP on 127.0.0.1:{rabbit}" in result.stderr
    assert f"NATS: nothing accepts connections on 127.0.0.1:{nats}" in result.stderr


def test_start_script_with_docker_never_recreates_a_running_container() -> None:
    lines = [line.strip() for line in START_SCRIPT.read_text().splitlines()]
    [up] = [line for line in lines if line.startswith("docker compose") and " up " in line]
    assert "--no-recreate" in up


def _recipe(target: str) -> list[str]:
    """The command lines of a Makefile target, continuation lines joined."""
    text = MAKEFILE.read_text().replace("\\\n", " ")
    match = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert match, f"no target {target} in the Makefile"
    return [line.strip() for line in match.group(1).splitlines()]


def test_make_bench_starts_no_service_and_only_checks_them() -> None:
    scripted = [line for line in _recipe("bench") if "start-local-services.sh" in line]
    assert scripted == ["bash compose/start-local-services.sh --check"]


@pytest.mark.parametrize("target", ["run", "test"])
def test_make_says_what_it_installs_before_installing_it(target: str) -> None:
    recipe = _recipe(target)
    pip = next(i for i, line in enumerate(recipe) if "-m pip install" in line)
    assert any(line.startswith("@echo") and "installing" in line for line in recipe[:pip])
    apt = [line for line in recipe if "apt-get install" in line]
    assert all("echo" in line and "installing Chromium" in line for line in apt)


def _deployments() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all((KUBERNETES / "deployments.yaml").read_text()) if d]
    assert {d["kind"] for d in documents} == {"Deployment"}
    return {d["metadata"]["name"]: d for d in documents}


def _scaled_object() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KUBERNETES / "keda-scaledobject.yaml").read_text())
    return document


def _procfile() -> dict[str, str]:
    lines = [line.split(":", 1) for line in PROCFILE.read_text().splitlines() if line.strip()]
    return {name.strip(): command.strip() for name, command in lines}


def test_kubernetes_has_a_deployment_per_procfile_process_type() -> None:
    assert set(_deployments()) == set(_procfile())


@pytest.mark.parametrize("process_type", ["web", "worker", "relay", "scheduler"])
def test_kubernetes_deployment_runs_its_procfile_command_with_probes(process_type: str) -> None:
    [container] = _deployments()[process_type]["spec"]["template"]["spec"]["containers"]
    procfile = _procfile()[process_type].removeprefix("exec ").replace("$PORT", "$(PORT)")
    assert " ".join(container["command"]) == procfile
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    environment = {e["name"]: e["value"] for e in container["env"]}
    assert environment["CONVEYOR_HTTP_HOST"] == "0.0.0.0"  # probes come from outside the pod


def test_keda_scaled_object_targets_the_worker_deployment() -> None:
    scaled = _scaled_object()
    assert scaled["kind"] == "ScaledObject"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "worker")
    assert target["name"] in _deployments()
    assert scaled["spec"]["minReplicaCount"] >= 1, "workers report the backlog: none left, no signal"


def test_keda_trigger_queries_the_backlog_metric_the_worker_exports() -> None:
    [trigger] = _scaled_object()["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    used = set(re.findall(r"\bconveyor_[a-z_]+", trigger["metadata"]["query"]))
    importlib.import_module("conveyor.telemetry")  # registers the runtime's metrics
    exported = {metric.name for metric in prometheus_client.REGISTRY.collect()}
    assert used == {"conveyor_backlog"}
    assert used <= exported
    assert float(trigger["metadata"]["threshold"]) > 0
