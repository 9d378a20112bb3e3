"""Static checks of compose/docker-compose.yml, compose/start-local-services.sh and compose/kubernetes/.

Nothing here needs Docker, Kubernetes or a running service: the compose file and the
Kubernetes manifests are parsed with PyYAML and the script is only syntax-checked with
``bash -n``.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
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
