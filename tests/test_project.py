"""What Docker and people read must match the code: the compose file and the settings table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from pydantic import SecretStr

from calhook.cli import main
from calhook.constants import DISPATCH_QUEUE
from calhook.settings import Settings, env_names
from workers.registry import BUILTIN_MODULES, load_modules, registry

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def readme_settings() -> dict[str, str]:
    """Variable → default, from the README's settings table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", table, flags=re.MULTILINE)
    return {name: default.strip().strip("`") for name, default in rows}


def test_readme_lists_every_setting_and_nothing_else() -> None:
    assert set(readme_settings()) == set(env_names().values())


def test_readme_defaults_are_the_real_defaults() -> None:
    documented = readme_settings()
    for field, name in env_names().items():
        default = Settings.model_fields[field].get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if default in (None, (), {}, ""):
            assert documented[name] == "(none)" or documented[name] in ("{}", "(unset)"), name
            continue
        if isinstance(default, tuple):
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        assert documented[name].lower() == str(default).lower(), name


def calhook_services() -> dict[str, list[str]]:
    return {
        name: service["command"]
        for name, service in SERVICES.items()
        if service.get("command", [None])[0] == "calhook"
    }


@pytest.mark.parametrize("service", sorted(calhook_services()))
def test_compose_commands_are_valid_calhook_invocations(service: str) -> None:
    args = calhook_services()[service][1:]
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"{service}: no command {args[0]!r}"
    command.make_context(args[0], list(args[1:]))  # raises on an unknown option


def test_compose_variables_are_settings() -> None:
    known = set(env_names().values())
    for name, service in SERVICES.items():
        if service.get("command", [None])[0] != "calhook":
            continue
        assert set(service["environment"]) <= known, name


def test_compose_runs_a_worker_for_every_queue() -> None:
    load_modules(BUILTIN_MODULES)
    # Every built-in handler, configured or not (it runs where its service is).
    needed = {DISPATCH_QUEUE}
    needed |= {h.queue for h in registry if h.module.startswith("workers")}
    needed |= {h.queue for h, _ in registry.inactive.values() if h.module.startswith("workers")}
    served = set()
    for command in calhook_services().values():
        if command[1] == "worker":
            served |= set(command[command.index("-Q") + 1].split(","))
    assert needed <= served


def test_compose_redis_keeps_its_data_and_never_evicts() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert SERVICES["redis"]["volumes"]


def test_compose_gives_workers_a_longer_grace_than_the_soft_shutdown() -> None:
    soft_s = Settings.model_fields["soft_shutdown_s"].get_default()
    for name, command in calhook_services().items():
        if command[1] == "worker":
            grace = SERVICES[name]["stop_grace_period"]
            assert int(grace.rstrip("s")) > soft_s, name


def test_a_malformed_json_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from calhook.settings import SettingsError, load_settings

    monkeypatch.setenv("CALHOOK_ENDPOINTS", "{not json")

    with pytest.raises(SettingsError, match=r"^CALHOOK_ENDPOINTS: not valid JSON$"):
        load_settings()


def test_compose_runs_a_scheduler_and_keeps_the_spool_on_a_volume() -> None:
    assert ["calhook", "scheduler"] in calhook_services().values()
    dockerfile = (ROOT / "Dockerfile").read_text()
    spool_dir = re.search(r"^ENV CALHOOK_SPOOL_DIR=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert spool_dir is not None
    mounts = [volume.split(":", 1)[1] for volume in SERVICES["ingress"]["volumes"]]
    assert any(spool_dir.group(1).startswith(mount) for mount in mounts)
