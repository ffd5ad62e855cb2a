"""docker-compose.yml and docker/: the file parses, every flo-coord service runs a real subcommand
whose flags parse, dependencies exist, and the mounted configuration loads."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from flo_coord.cli.common import load
from flo_coord.cli.parser import build_parser

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _ours(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("flo-coord") or "build" in service


def test_every_flo_coord_service_runs_a_subcommand_whose_flags_parse(compose: dict[str, Any]) -> None:
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    ours = {name: s for name, s in compose["services"].items() if _ours(s)}
    assert {"fakellm", "replica-1", "replica-2", "replica-3"} <= set(ours)
    for name, service in ours.items():
        command = service["command"]
        assert isinstance(command, list) and command[0] in commands, name
        try:
            args = parser.parse_args([str(part) for part in command])
        except SystemExit as exc:  # argparse rejected the flags
            raise AssertionError(f"{name}: {command} does not parse") from exc
        assert args.command == command[0]


def test_three_serve_replicas_with_their_own_ids_health_checks_and_restarts(compose: dict[str, Any]) -> None:
    # issue 13: the replicas are gateways (flo-coord serve), each also a worker
    parser = build_parser()
    workers = {n: s for n, s in compose["services"].items() if _ours(s) and s["command"][0] == "serve"}
    assert sorted(workers) == ["replica-1", "replica-2", "replica-3"]
    ids = [parser.parse_args(s["command"]).worker_id for s in workers.values()]
    assert ids == ["replica-1", "replica-2", "replica-3"]
    for name, service in workers.items():
        assert service["restart"] == "unless-stopped", name
        assert "healthcheck" in service and service["healthcheck"]["test"], name
        args = parser.parse_args(service["command"])
        assert args.host == "0.0.0.0" and args.port, name
        check = " ".join(service["healthcheck"]["test"])
        assert f"{args.port}/readyz" in check, name  # it checks readiness on the gateway's port
    for name in ("redis", "fakellm"):
        assert "healthcheck" in compose["services"][name] and compose["services"][name].get("restart"), name
    client = compose["services"]["client"]
    assert client["restart"] == "no"
    assert "curl" in client["image"] and "http://replica-1:8080/v1/chat/completions" in client["command"]
    body = json.loads(client["command"][client["command"].index("-d") + 1])
    assert body["stream"] is True and body["model"] == "compose-vllm"


def test_redis_runs_with_the_append_only_file(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", []))


def test_depends_on_targets_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        targets = depends if isinstance(depends, list) else list(depends)
        for target in targets:
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
        if isinstance(depends, dict):
            for target, condition in depends.items():
                if condition.get("condition") == "service_healthy":
                    assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"


def test_mounted_config_and_dockerfile(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("FLO_REDIS_URL", "FLO_NAMESPACE", "FLO_LEASE_TTL", "FLO_CONFIG", "FLO_DURABILITY"):
        monkeypatch.delenv(variable, raising=False)
    worker = compose["services"]["replica-1"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in worker["volumes"]}
    config_path = worker["environment"]["FLO_CONFIG"]
    source = ROOT / mounts[config_path]
    args = build_parser().parse_args([*worker["command"], "--config", str(source)])
    settings = load(args)
    assert [b.name for b in settings.backends] == ["Vllm", "Ollama"]
    assert [b.value for b in settings.failover.fallback_order] == ["Vllm", "Ollama"]
    assert all(b.base_url == "http://fakellm:8001" for b in settings.backends)  # the fakellm service's port
    assert "8001" in " ".join(compose["services"]["fakellm"]["command"])
    assert (settings.gateway.host, settings.gateway.port) == ("0.0.0.0", 8080)
    assert "compose-vllm" in {b.model for b in settings.backends}  # the client's model exists
    dockerfile = (ROOT / worker["build"]["dockerfile"]).read_text()
    assert 'ENTRYPOINT ["flo-coord"]' in dockerfile
    assert "pip install" in dockerfile and "gateway" in dockerfile  # serve needs the gateway extra


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker is not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
