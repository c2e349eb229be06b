"""Structure of the deployment: docker-compose.yml, the Dockerfile, deploy/mosquitto.conf.

Docker cannot run on the development and CI machines (there is no engine, only the client), so these
tests cannot start the stack. They parse the files and check what would otherwise fail only at
deployment time: the five services and the scaled profile's role services, a healthcheck on each, start order on healthy dependencies, Redis
persistence, named volumes, service URLs wired to the compose host names, and a non-root image with
the ``scada`` entrypoint.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SINGLE = {"timescaledb", "redis", "mosquitto", "server", "simulators"}
SCALED = {"gateway-0", "gateway-1", "historian", "analytics", "control"}
SERVICES = SINGLE | SCALED
BACKENDS = {"timescaledb", "redis", "mosquitto"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in logical.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _test_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def _interpolate(text: str, environ: dict[str, str]) -> str:
    """Substitute ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` as compose does."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in environ and environ[name] != "":
            return environ[name]
        if op == ":?":
            raise AssertionError(f"compose would refuse to start: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, text)


def test_interpolate_like_compose() -> None:
    assert _interpolate("a${X}b${Y:-d}c", {"X": "1"}) == "a1bdc"
    with pytest.raises(AssertionError, match="set it"):
        _interpolate("${Z:?set it}", {})


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_spec_without_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose  # the compose spec ignores it and warns
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets", "name"} | {
        key for key in compose if key.startswith("x-")
    }


def test_the_five_services_and_the_scaled_profile(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES
    assert {name for name, s in services.items() if "profiles" not in s} == SINGLE
    assert all(services[name]["profiles"] == ["scaled"] for name in SCALED)


def test_scaled_profile_covers_every_role_once_and_shards_the_gateways(
    services: dict[str, dict[str, Any]],
) -> None:
    roles = {name: _command(services[name])[-1] for name in SCALED}
    assert set(roles.values()) == {"gateway", "historian", "analytics", "control"}
    assert all(_command(services[name])[-2] == "--role" for name in SCALED)
    shards = sorted(
        _env(services[n])["SCADA_GATEWAY_SHARD"] for n, role in roles.items() if role == "gateway"
    )
    assert shards == ["0/2", "1/2"]  # every device has exactly one gateway
    assert services["historian"]["deploy"]["replicas"] >= 2  # replicas share the consumer group
    assert services["control"]["deploy"]["replicas"] >= 2  # a standby for the lease
    # Every role process reaches the same services with the same signing key as the API.
    server_env = _env(services["server"])
    for name in SCALED:
        env = _env(services[name])
        for key in ("SCADA_DB_URL", "SCADA_REDIS_URL", "SCADA_MQTT_URL", "SCADA_SECRET_KEY"):
            assert env[key] == server_env[key], f"{name}: {key}"
        assert set(services[name]["depends_on"]) == BACKENDS
        assert services[name]["image"] == services["server"]["image"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name]["healthcheck"]
    assert not check.get("disable", False)
    test = check["test"]
    assert (isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}) or isinstance(test, str)
    for key in ("interval", "timeout", "retries"):
        assert key in check, f"{name}: healthcheck.{key}"


def test_healthchecks_probe_the_right_thing(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in _test_command(services["timescaledb"])
    assert "-h 127.0.0.1" in _test_command(services["timescaledb"])  # TCP, not the init-time socket
    assert "redis-cli ping" in _test_command(services["redis"])
    assert "mosquitto_pub" in _test_command(services["mosquitto"])
    assert "http://127.0.0.1:8080/api/v1/health" in _test_command(services["server"])
    assert "simulators" in _test_command(services["simulators"])


def test_server_starts_after_healthy_backends(services: dict[str, dict[str, Any]]) -> None:
    depends = services["server"]["depends_on"]
    assert isinstance(depends, dict)
    assert set(depends) == BACKENDS
    assert {dep["condition"] for dep in depends.values()} == {"service_healthy"}


def test_every_depends_on_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use the long depends_on syntax with a condition"
        for dependency, spec in depends.items():
            assert dependency in SERVICES
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"


def test_images_are_the_documented_ones(services: dict[str, dict[str, Any]]) -> None:
    assert re.fullmatch(r"timescale/timescaledb:(latest|2\.\d+\.\d+)-pg15", services["timescaledb"]["image"])
    assert services["redis"]["image"] == "redis:7"
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    for name in ("server", "simulators"):
        assert services[name]["build"] in (".", {"context": "."})
    assert services["server"]["image"] == services["simulators"]["image"]  # one image, two commands


def test_redis_appends_to_its_aof(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["redis"])
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"


def test_volumes_are_declared_and_used(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose["volumes"])
    used = {
        mount.split(":", 1)[0]
        for service in services.values()
        for mount in service.get("volumes", [])
        if not mount.startswith((".", "/"))
    }
    assert used <= declared
    assert declared <= used
    mounts = {name: [m.split(":")[1] for m in s.get("volumes", [])] for name, s in services.items()}
    assert "/var/lib/postgresql/data" in mounts["timescaledb"]
    assert "/data" in mounts["redis"]
    assert "/mosquitto/data" in mounts["mosquitto"]


def test_mosquitto_config_is_mounted_and_listens_on_1883(services: dict[str, dict[str, Any]]) -> None:
    assert "./deploy/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in services["mosquitto"]["volumes"]
    lines = [line.split() for line in (ROOT / "deploy" / "mosquitto.conf").read_text().splitlines()]
    directives = {words[0]: words[1:] for words in lines if words and not words[0].startswith("#")}
    assert directives["listener"] == ["1883"]  # without it Mosquitto 2 accepts local clients only
    assert directives["allow_anonymous"] == ["true"]
    assert directives["persistence_location"] == ["/mosquitto/data/"]


def test_server_env_points_at_the_compose_host_names(services: dict[str, dict[str, Any]]) -> None:
    env = _env(services["server"])
    db, redis, mqtt = (
        urlsplit(_interpolate(env[f"SCADA_{name}_URL"], {"SCADA_DB_PASSWORD": "pw"}))
        for name in ("DB", "REDIS", "MQTT")
    )
    assert db.password == "pw"
    assert (db.scheme, db.hostname, db.port, db.path) == ("postgresql", "timescaledb", 5432, "/scada")
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert (mqtt.scheme, mqtt.hostname, mqtt.port) == ("mqtt", "mosquitto", 1883)
    assert env["SCADA_HTTP_HOST"] == "0.0.0.0"
    # The password comes from the environment, the same variable on both sides.
    timescale = _env(services["timescaledb"])
    assert db.username == timescale["POSTGRES_USER"]
    assert db.path == "/" + timescale["POSTGRES_DB"]
    assert "${SCADA_DB_PASSWORD" in timescale["POSTGRES_PASSWORD"]
    assert "${SCADA_DB_PASSWORD" in env["SCADA_DB_URL"]


def test_server_and_simulators_commands(services: dict[str, dict[str, Any]]) -> None:
    # The image's entrypoint is `scada`: the compose command holds its arguments.
    site = "${SCADA_SITE_FILE:-/app/examples/plant.compose.yaml}"
    assert _command(services["server"]) == ["run", "-c", site, "--role", "${SCADA_SERVER_ROLE:-all}"]
    assert _command(services["simulators"]) == ["simulate", "-c", site]
    assert any(port.endswith(":8080") for port in services["server"]["ports"])
    assert "ports" not in services["timescaledb"]  # backends stay inside the compose network


def test_dockerfile_runs_scada_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    keywords = [keyword for keyword, _ in dockerfile]
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in dockerfile if keyword == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")  # installs as root
    entrypoint = next(args for keyword, args in dockerfile if keyword == "ENTRYPOINT")
    assert entrypoint == '["scada"]'
    assert any(keyword == "RUN" and "pip install" in args for keyword, args in dockerfile)
    healthcheck = next(args for keyword, args in dockerfile if keyword == "HEALTHCHECK")
    assert "http://127.0.0.1:8080/api/v1/health" in healthcheck


def test_dockerfile_copies_every_package_setuptools_includes(dockerfile: list[tuple[str, str]]) -> None:
    import tomllib  # noqa: PLC0415

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {
        pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {args.split()[0] for keyword, args in dockerfile if keyword == "COPY"}
    assert packages <= copied
    assert "examples" in copied  # the default site file of the compose commands


def test_image_derives_the_compose_site_from_the_example_and_checks_it() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "examples/plant.compose.yaml" in dockerfile
    assert "scada check-config examples/plant.compose.yaml" in dockerfile
    assert (ROOT / ".dockerignore").read_text(encoding="utf-8").count(".venv") == 1
