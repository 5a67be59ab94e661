"""docker-compose.yml's `sentinel` profile holds together, read the way compose reads the file.

Docker does not run where the suite runs, so the file is checked by reading it: PyYAML resolves
its anchors and merge keys, `${...}` is interpolated here as compose does, from the variables of
deploy/compose/sentinel.env (the Sentinel variant) or from none (the default stack), and a
service counts when it has no profile or one that COMPOSE_PROFILES names. Then the sentinels
must monitor a service that exists, the replica follow that service, and calhook's REDIS_URL
name those sentinels and that master. Where Docker Compose v2 is installed (the docker plugin or
a standalone binary), its `config -q` must accept the file too, with and without the profile.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from calhook.redis_url import parse_sentinel
from calhook.settings import env_names, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SENTINEL_ENV = ROOT / "deploy" / "compose" / "sentinel.env"
#: What the file insists on (`${CALHOOK_AUTH_SECRETS:?...}`); a person's .env gives it.
REQUIRED = {"CALHOOK_AUTH_SECRETS": "placeholder-from-dot-env"}
SENTINEL_PORT = 26379
REDIS_PORT = 6379
_VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)

Service = dict[str, Any]


def env_file(path: Path) -> dict[str, str]:
    """The variables of a compose env file (NAME=value lines; # comments)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """``value`` with `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME:?error}` replaced."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        name = match["name"] or match["bare"]
        found = variables.get(name)
        unset = found is None or (found == "" and (match["op"] or "").startswith(":"))
        if not unset or not match["op"]:
            return found or ""
        if match["op"].endswith("?"):
            raise AssertionError(f"compose would refuse the file: {name} {match['arg']}")
        return str(match["arg"])

    return _VARIABLE.sub(replace, value)


def stack(variables: dict[str, str]) -> dict[str, Service]:
    """The services `docker compose up` starts with ``variables``, as compose reads them."""
    model = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {**REQUIRED, **variables})
    profiles = set(filter(None, variables.get("COMPOSE_PROFILES", "").split(",")))
    return {
        name: service
        for name, service in model["services"].items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


DEFAULT = stack({})
SENTINEL = stack(env_file(SENTINEL_ENV))


def sentinels(services: dict[str, Service]) -> dict[str, Service]:
    return {name: s for name, s in services.items() if "--sentinel" in " ".join(script(s))}


def script(service: Service) -> list[str]:
    """The shell words a service runs: its entrypoint and command, `sh -c` scripts split."""
    words = [*service.get("entrypoint", []), *service.get("command", [])]
    if words[:2] == ["/bin/sh", "-c"]:
        return str(words[2]).split()
    return [str(word) for word in words]


def sentinel_conf(service: Service) -> list[list[str]]:
    """The lines of the config a sentinel writes at its first start, its variables expanded."""
    (text,) = re.findall(r"<<EOF\n(.*?)^EOF$", service["entrypoint"][-1], re.DOTALL | re.M)
    expanded = re.sub(r"\$(\w+)", lambda m: service["environment"][m[1]], text)
    return [shlex.split(line) for line in expanded.splitlines() if line.strip()]


def monitored(service: Service) -> tuple[str, str, int, int]:
    """The master a sentinel monitors: name, host, port and quorum."""
    (line,) = [line for line in sentinel_conf(service) if line[:2] == ["sentinel", "monitor"]]
    return line[2], line[3], int(line[4]), int(line[5])


def option(command: list[str], name: str) -> list[str]:
    """The values after ``--name`` on a redis-server command line, up to the next option."""
    at = command.index(f"--{name}") + 1
    end = next((i for i in range(at, len(command)) if command[i].startswith("--")), len(command))
    return [str(word) for word in command[at:end]]


def calhook_services(services: dict[str, Service]) -> dict[str, Service]:
    return {name: s for name, s in services.items() if s.get("command", [None])[0] == "calhook"}


@pytest.mark.parametrize("services", [DEFAULT, SENTINEL], ids=["default", "sentinel"])
def test_every_service_waits_only_for_services_of_the_same_stack(
    services: dict[str, Service],
) -> None:
    # Compose refuses a file whose started service depends on one its profiles leave out.
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def test_the_default_stack_is_one_redis_as_before() -> None:
    assert not sentinels(DEFAULT)
    assert {name for name in DEFAULT if "redis" in name} == {"redis"}
    for name, service in calhook_services(DEFAULT).items():
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0", name
    assert DEFAULT["ingress"]["environment"]["CALHOOK_ACK_DURABILITY"] == "written"


def test_the_sentinel_env_file_starts_a_replica_and_three_sentinels() -> None:
    added = set(SENTINEL) - set(DEFAULT)
    assert added == {"redis-replica", *sentinels(SENTINEL)}
    assert len(sentinels(SENTINEL)) == 3
    for name in added:
        assert SENTINEL[name]["profiles"] == ["sentinel"], name


@pytest.mark.parametrize("name", sorted(sentinels(SENTINEL)))
def test_each_sentinel_monitors_the_master_service_by_its_name(name: str) -> None:
    service = SENTINEL[name]
    conf = sentinel_conf(service)
    master, host, port, quorum = monitored(service)
    assert host in SENTINEL
    assert port == REDIS_PORT
    assert "--port" not in SENTINEL[host]["command"]
    # A majority of the sentinels, so two halves of a split can never both fail over.
    assert len(sentinels(SENTINEL)) // 2 < quorum <= len(sentinels(SENTINEL))
    # Hostnames are resolved only for the lines after this one.
    names = conf.index(["sentinel", "resolve-hostnames", "yes"])
    assert names < conf.index(["sentinel", "monitor", master, host, str(port), str(quorum)])
    assert ["sentinel", "announce-hostnames", "yes"] in conf
    assert ["sentinel", "announce-ip", name] in conf
    assert ["port", str(SENTINEL_PORT)] in conf
    assert ["sentinel", "down-after-milliseconds", master, "5000"] in conf
    assert ["sentinel", "failover-timeout", master, "60000"] in conf
    # The file it runs is the file it writes.
    written = re.search(r"cat > (\S+) <<EOF", service["entrypoint"][-1])
    assert written is not None
    assert script(service)[-3:] == ["redis-server", written[1], "--sentinel"]
    assert set(service["depends_on"]) == {host}


def test_the_sentinels_agree_and_the_replica_follows_their_master() -> None:
    # One master (name, host, port, quorum) for all three.
    (master,) = {monitored(service) for service in sentinels(SENTINEL).values()}
    _, host, port, _ = master
    replica = SENTINEL["redis-replica"]["command"]
    assert option(replica, "replicaof") == [host, str(port)]
    # The name a server gives the sentinels once it is a replica: its own service's.
    assert option(replica, "replica-announce-ip") == ["redis-replica"]
    assert option(SENTINEL[host]["command"], "replica-announce-ip") == [host]


@pytest.mark.parametrize("name", ["redis", "redis-replica"])
def test_both_servers_keep_an_append_only_file_and_never_evict(name: str) -> None:
    command = SENTINEL[name]["command"]
    # The replica's file too: `replicated` (WAITAOF) counts only replicas that wrote to theirs.
    assert option(command, "appendonly") == ["yes"]
    assert option(command, "appendfsync") == ["everysec"]
    assert option(command, "maxmemory-policy") == ["noeviction"]
    assert any(volume.endswith(":/data") for volume in SENTINEL[name]["volumes"])


@pytest.mark.parametrize("name", ["redis", "redis-replica", *sorted(sentinels(SENTINEL))])
def test_every_server_and_sentinel_has_a_healthcheck(name: str) -> None:
    test = SENTINEL[name]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    if name in sentinels(SENTINEL):
        # Healthy means able to fail this master over, not only up.
        assert f"ckquorum {monitored(SENTINEL[name])[0]}" in test[-1]


def test_calhook_reaches_the_master_through_all_the_sentinels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (master,) = {monitored(service)[0] for service in sentinels(SENTINEL).values()}
    calhook = calhook_services(SENTINEL)
    assert {"ingress", "scheduler", "exporter"} <= set(calhook)
    for name, service in calhook.items():
        # Read by calhook's own parser, as the process in that container reads it.
        target = parse_sentinel(service["environment"]["REDIS_URL"])
        assert target is not None, name
        named = sorted(target.sentinels)
        assert named == [(s, SENTINEL_PORT) for s in sorted(sentinels(SENTINEL))], name
        assert target.master_name == master, name
        assert target.db == 0, name
    for name in env_names().values():
        monkeypatch.delenv(name, raising=False)
    for name, value in SENTINEL["ingress"]["environment"].items():
        monkeypatch.setenv(name, value)
    settings = load_settings()  # raises SettingsError on a URL calhook does not accept
    assert settings.redis_url == SENTINEL["ingress"]["environment"]["REDIS_URL"]


def test_the_ingress_answers_once_the_replica_has_the_event() -> None:
    assert SENTINEL["ingress"]["environment"]["CALHOOK_ACK_DURABILITY"] == "replicated"
    assert option(SENTINEL["redis-replica"]["command"], "appendonly") == ["yes"]


def compose() -> list[str] | None:
    """The Docker Compose v2 command here: the docker plugin, or a standalone binary; or None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            found = subprocess.run(
                [*command, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except FileNotFoundError:
            continue
        if found.returncode == 0 and found.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


COMPOSE = compose()


@pytest.mark.skipif(
    COMPOSE is None,
    reason="no Docker Compose v2: the docker CLI has no compose plugin (`docker compose version` "
    "fails) and no standalone docker-compose v2 is on PATH",
)
@pytest.mark.parametrize("variables", [{}, env_file(SENTINEL_ENV)], ids=["default", "sentinel"])
def test_docker_compose_accepts_the_file(variables: dict[str, str]) -> None:
    assert COMPOSE is not None
    # COMPOSE_PROFILES from sentinel.env does what `--profile sentinel` would.
    env = {**os.environ, **REQUIRED, **variables}
    subprocess.run(
        [*COMPOSE, "-f", str(COMPOSE_FILE), "config", "-q"],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=60,
    )
