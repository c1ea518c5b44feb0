"""compose.yaml: valid against the Compose specification, and consistent with the code it runs.

The schema check is check-jsonschema's vendored Compose schema (offline). The rest is one function,
``compose_problems``, that lists every place where compose.yaml disagrees with cascade: settings that
CascadeSettings does not have, queues that publish.py does not declare or that no worker consumes,
`cascade` commands and options that the CLI does not have, and the production rules (Flower behind
auth, Redis with AOF, supervised workers, the sim only in the dev profile).
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from cascade.cli import app as cli_app
from cascade.config import CascadeSettings
from cascade.publish import all_queues

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
QUEUES = set(all_queues())
SETTING = re.compile(r"\bCASCADE_[A-Z0-9_]+")
REQUIRED_VAR = re.compile(r"^\$\{FLOWER_BASIC_AUTH:\?[^}]+\}$")
SHARED_ENV = ("CASCADE_DATABASE_URL", "CASCADE_BROKER_URL", "CASCADE_CONFIG")


def _argv(command: Any) -> list[str]:  # Any: a compose command (string or list)
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _strings(node: Any) -> list[str]:  # Any: parsed YAML
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _is_celery(argv: list[str], sub: str) -> bool:
    return argv[:1] == ["celery"] and sub in argv and "workers.app" in argv


def _worker_queues(argv: list[str]) -> list[str]:
    queues: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("-Q", "--queues") and i + 1 < len(argv):
            queues += argv[i + 1].split(",")
        elif arg.startswith(("-Q=", "--queues=")):
            queues += arg.split("=", 1)[1].split(",")
    return queues


def _settings_problems(compose: dict[str, Any]) -> list[str]:
    fields = set(CascadeSettings.model_fields)
    used = {m for s in _strings(compose) for m in SETTING.findall(s)}
    return [f"{name} is not a CascadeSettings field" for name in sorted(used)
            if name.removeprefix("CASCADE_").lower() not in fields]


def _queue_problems(services: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    consumed: set[str] = set()
    for name, service in services.items():
        argv = _argv(service.get("command"))
        if not _is_celery(argv, "worker"):
            continue
        queues = _worker_queues(argv)
        if not queues:
            problems.append(f"{name}: worker without -Q (it would consume the default queue only)")
        problems += [f"{name}: unknown queue {q!r} (publish.py declares {sorted(QUEUES)})"
                     for q in queues if q not in QUEUES]
        consumed.update(queues)
        if service.get("restart") != "unless-stopped":
            problems.append(f"{name}: workers must have restart: unless-stopped, not {service.get('restart')!r}")
    problems += [f"queue {q!r} has no worker service" for q in sorted(QUEUES - consumed)]
    return problems


def _cli_problems(name: str, argv: list[str]) -> list[str]:
    """`cascade ...` must name an existing (sub)command and only options that command has."""
    # Any: Typer's click command tree (typer 0.29 vendors click, so no click types here); groups have .commands
    command: Any = typer.main.get_command(cli_app)
    path = ["cascade"]
    args = argv[1:]
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            return [f"{name}: unknown command `{' '.join([*path, args[0]])}`"]
        path.append(args.pop(0))
        command = sub
    if hasattr(command, "commands"):
        return [f"{name}: `{' '.join(path)}` needs a subcommand"]
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    return [f"{name}: `{' '.join(path)}` has no option {arg.split('=', 1)[0]}"
            for arg in args if arg.startswith("-") and arg.split("=", 1)[0] not in options]


def _service_rules(name: str, service: dict[str, Any]) -> list[str]:
    argv = _argv(service.get("command"))
    problems: list[str] = []
    if argv[:1] == ["cascade"]:
        problems += _cli_problems(name, argv)
    if argv[:1] in (["cascade"], ["celery"]):
        env = _environment(service)
        problems += [f"{name}: missing {var}" for var in SHARED_ENV if var not in env]
        if "build" not in service:
            problems.append(f"{name}: app services are built from the Dockerfile (build: .)")
    if _is_celery(argv, "flower"):
        auth = _environment(service).get("FLOWER_BASIC_AUTH", "")
        if not REQUIRED_VAR.match(auth):
            problems.append(f"{name}: FLOWER_BASIC_AUTH must be required (${{FLOWER_BASIC_AUTH:?...}}), got {auth!r}")
    if argv[:2] == ["cascade", "sweep"] and service.get("restart") != "unless-stopped":
        problems.append(f"{name}: the sweeper must have restart: unless-stopped")
    if argv[:2] == ["cascade", "sim"] and "dev" not in (service.get("profiles") or []):
        problems.append(f"{name}: the sim must be in the dev profile only")
    is_redis = str(service.get("image", "")).startswith("redis:")
    if is_redis and not re.search(r"--appendonly\s+yes", " ".join(argv)):
        problems.append(f"{name}: Redis must run with --appendonly yes")
    return problems


def compose_problems(compose: dict[str, Any]) -> list[str]:  # Any: parsed YAML
    """Every disagreement between a parsed compose file and cascade's code; empty when consistent."""
    services: dict[str, Any] = compose.get("services") or {}
    problems = _settings_problems(compose) + _queue_problems(services)
    for name, service in services.items():
        problems += _service_rules(name, service)
    if not any(_is_celery(_argv(s.get("command")), "flower") for s in services.values()):
        problems.append("no flower service")
    images = {s.get("image") for s in services.values() if "build" in s}
    if len(images) > 1:
        problems.append(f"app services use different images: {sorted(map(str, images))}")
    return problems


def _load() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def test_compose_matches_the_compose_schema():
    result = _check_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_an_invalid_file(tmp_path):
    # Given compose.yaml with a misspelt key (the spec allows only known keys and x- extensions)
    data = _load()
    data["services"]["redis"]["restartt"] = "always"
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(data), encoding="utf-8")
    # Then the schema check fails and names it
    result = _check_schema(broken)
    assert result.returncode == 1
    assert "restartt" in result.stdout + result.stderr


def test_compose_is_consistent_with_the_code():
    assert compose_problems(_load()) == []


def test_compose_has_the_production_shape():
    services = _load()["services"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("worker-tier1", "worker-tier2", "worker-tier3", "worker-validate", "sweeper"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    concurrency = {name: _argv(services[name]["command"])[_argv(services[name]["command"]).index("-c") + 1]
                   for name in ("worker-tier1", "worker-tier2", "worker-tier3")}
    assert len(set(concurrency.values())) == 3, concurrency  # each tier sized on its own
    mount = services["worker-tier1"]["volumes"][0]
    assert (mount["target"], mount["read_only"]) == ("/app/cascade.yaml", True)


def _set_command(service: str, old: str, new: str):
    def mutate(data: dict[str, Any]) -> None:
        argv = _argv(data["services"][service]["command"])
        data["services"][service]["command"] = [new if arg == old else arg for arg in argv]
    return mutate


def _set(service: str, key: str, value: Any):  # Any: a YAML value
    def mutate(data: dict[str, Any]) -> None:
        data["services"][service][key] = value
    return mutate


def _drop_service(service: str):
    def mutate(data: dict[str, Any]) -> None:
        del data["services"][service]
    return mutate


def _set_env(service: str, var: str, value: str):
    def mutate(data: dict[str, Any]) -> None:
        data["services"][service]["environment"] = {**_environment(data["services"][service]), var: value}
    return mutate


BREAKAGES = [
    ("unknown queue", _set_command("worker-tier1", "tier1", "tier4"), "unknown queue 'tier4'"),
    ("queue without worker", _drop_service("worker-validate"), "queue 'validate' has no worker"),
    ("unknown setting", _set_env("sweeper", "CASCADE_BROKER", "redis://redis"), "CASCADE_BROKER is not"),
    ("unknown command", _set_command("sweeper", "sweep", "sweeep"), "unknown command `cascade sweeep`"),
    ("unknown subcommand", _set_command("migrate", "upgrade", "migrate"), "unknown command `cascade db migrate`"),
    ("unknown option", _set_command("sweeper", "--every", "--every_s"), "no option --every_s"),
    ("open flower", _set_env("flower", "FLOWER_BASIC_AUTH", "${FLOWER_BASIC_AUTH:-}"), "must be required"),
    ("redis without AOF", _set("redis", "command", ["redis-server"]), "--appendonly yes"),
    ("unsupervised worker", _set("worker-tier2", "restart", "always"), "unless-stopped"),
    ("sim outside dev", _set("sim", "profiles", []), "dev profile"),
]


@pytest.mark.parametrize(("mutate", "expected"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES])
def test_a_broken_copy_is_caught(mutate, expected):
    # Given a copy of compose.yaml with one mistake
    data = copy.deepcopy(_load())
    mutate(data)
    # Then the same check reports it
    problems = compose_problems(data)
    assert any(expected in p for p in problems), problems
