"""The Kubernetes manifests (deploy/kubernetes) are valid, and agree with the code.

The kustomizations (base, and the sentinel overlay on top of it) are rendered here in Python:
they use `namespace`, `resources` and `images`, and the overlay `patches` of two kinds (a
strategic merge without lists, a JSON patch), and a test refuses any other key. So no cluster,
kubectl or network is needed: every object is checked against the Kubernetes JSON schemas that
kubernetes-validate ships, in strict mode (an unknown or misplaced field fails). KEDA's
ScaledObject is a custom resource with no bundled schema; its fields are checked one by one.
Where kubectl is installed, its own `kubectl kustomize` must render the same objects as the
Python renderer, for base and for the overlay.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import kubernetes_validate
import pytest
import yaml

from calhook.cli import main
from calhook.constants import DISPATCH_QUEUE
from calhook.redis_url import parse_sentinel
from calhook.settings import Settings, env_names, load_settings
from ingest.app import create_app
from ingest.server import SHUTDOWN_TIMEOUT_S
from workers.registry import BUILTIN_MODULES, load_modules, registry

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "kubernetes" / "base"
SENTINEL = ROOT / "deploy" / "kubernetes" / "sentinel"
KUSTOMIZATIONS = {"base": BASE, "sentinel": SENTINEL}
#: The oldest Kubernetes the manifests are meant for, and the newest schemas bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
#: The one Secret the manifests name; people create it, the repository never holds it.
SECRET_NAME = "calhook-secrets"
KNOWN_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
KNOWN_PATCH_KEYS = {"path", "target"}
KNOWN_TARGET_KEYS = {"group", "version", "kind", "name"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet"}
#: Where each KEDA Redis scaler is told the servers: one address, or the sentinels.
KEDA_ADDRESS_KEYS = {
    "redis": {"address", "addressFromEnv", "host", "hostFromEnv"},
    "redis-sentinel": {"addresses", "addressesFromEnv", "hosts", "hostsFromEnv"},
}

Manifest = dict[str, Any]


def render(folder: Path) -> list[Manifest]:
    """The objects `kubectl kustomize folder` prints, for the keys this project uses."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[Manifest] = []
    for resource in kustomization["resources"]:
        if (folder / resource).is_dir():
            objects += render(folder / resource)
        else:
            objects += [doc for doc in yaml.safe_load_all((folder / resource).read_text()) if doc]
    for patch in kustomization.get("patches", []):
        apply_patch(objects, yaml.safe_load((folder / patch["path"]).read_text()), patch)
    images = {image["name"]: image for image in kustomization.get("images", [])}
    for obj in objects:
        if "namespace" in kustomization and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = kustomization["namespace"]
        for container in containers(obj):
            image = images.get(container["image"].split(":")[0])
            if image is not None:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    return objects


def apply_patch(objects: list[Manifest], body: Any, patch: Manifest) -> None:
    """Apply one entry of `patches`: a JSON patch to its target, or a strategic merge."""
    if isinstance(body, list):
        targets = [obj for obj in objects if is_target(obj, patch["target"])]
        assert targets, f"{patch['path']}: no object is its target"
        for obj in targets:
            for operation in body:
                json_patch(obj, operation)
    else:
        assert "target" not in patch, f"{patch['path']}: a merge finds its object by name"
        (obj,) = [
            obj
            for obj in objects
            if (obj["kind"], obj["metadata"]["name"]) == (body["kind"], body["metadata"]["name"])
        ]
        merge(obj, body)


def is_target(obj: Manifest, target: Manifest) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"]}
    wanted["name"] = obj["metadata"]["name"]
    return all(wanted[field] == value for field, value in target.items())


def merge(obj: Manifest, patch: Manifest) -> None:
    """A strategic merge without lists (whose merge keys this renderer does not know)."""
    for key, value in patch.items():
        assert not isinstance(value, list), f"{key}: a list in a merge patch"
        if value is None:
            obj.pop(key, None)
        elif isinstance(value, dict) and isinstance(obj.get(key), dict):
            merge(obj[key], value)
        else:
            obj[key] = copy.deepcopy(value)


def json_patch(obj: Manifest, operation: Manifest) -> None:
    """One `add`, `replace` or `remove` of RFC 6902 (the ones kustomize users write)."""
    *parents, last = [
        part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
    ]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if operation["op"] == "remove":
        del node[key]
    elif operation["op"] == "replace":
        assert key in node if isinstance(node, dict) else key < len(node), operation["path"]
        node[key] = operation["value"]
    else:
        assert operation["op"] == "add", operation
        if isinstance(node, list):
            node.insert(key, operation["value"])
        else:
            node[key] = operation["value"]


def containers(obj: Manifest) -> list[Manifest]:
    if obj["kind"] not in WORKLOADS:
        return []
    spec = obj["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


RENDERED = {name: render(folder) for name, folder in KUSTOMIZATIONS.items()}
OBJECTS = RENDERED["base"]


def key(obj: Manifest) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def by_kind(kind: str, objects: list[Manifest] = OBJECTS) -> dict[str, Manifest]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def workloads(objects: list[Manifest] = OBJECTS) -> dict[str, Manifest]:
    return {name: obj for kind in WORKLOADS for name, obj in by_kind(kind, objects).items()}


def calhook_command(obj: Manifest) -> list[str]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    command: list[str] = container["command"]
    return command


def worker_queues(objects: list[Manifest] = OBJECTS) -> dict[str, list[str]]:
    """Worker Deployment → the queues of its `-Q`."""
    queues = {}
    for name, obj in by_kind("Deployment", objects).items():
        command = calhook_command(obj)
        if command[:2] == ["calhook", "worker"]:
            queues[name] = command[command.index("-Q") + 1].split(",")
    return queues


def container_env(obj: Manifest, objects: list[Manifest]) -> dict[str, str]:
    """The variables a workload's container gets from its ConfigMaps and its `env` (no Secret)."""
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    config_maps = by_kind("ConfigMap", objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
    env.update({var["name"]: var["value"] for var in container.get("env", [])})
    return env


def pod_settings(
    obj: Manifest, monkeypatch: pytest.MonkeyPatch, objects: list[Manifest] = OBJECTS
) -> Settings:
    """The settings a workload's container reads: the ConfigMap, its env, a stand-in Secret."""
    for name in env_names().values():
        monkeypatch.delenv(name, raising=False)
    for name, value in container_env(obj, objects).items():
        monkeypatch.setenv(name, value)
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    if any("secretRef" in source for source in container.get("envFrom", [])):
        monkeypatch.setenv("CALHOOK_AUTH_SECRETS", "placeholder-from-the-secret")
    return load_settings()


def keda_variables(objects: list[Manifest]) -> set[str]:
    """The variables of the workers' environment that KEDA's triggers read (`...FromEnv`)."""
    return {
        value
        for obj in by_kind("ScaledObject", objects).values()
        for trigger in obj["spec"]["triggers"]
        for name, value in trigger["metadata"].items()
        if name.endswith("FromEnv")
    }


def keda_reads(trigger: Manifest, env: dict[str, str]) -> dict[str, str]:
    """A trigger's metadata as KEDA reads it: each `xFromEnv` replaced by `x` from ``env``."""
    read = {}
    for name, value in trigger["metadata"].items():
        if name.endswith("FromEnv"):
            read[name.removesuffix("FromEnv")] = env[value]
        else:
            read[name] = value
    return read


@pytest.mark.parametrize("folder", KUSTOMIZATIONS.values(), ids=KUSTOMIZATIONS.keys())
def test_the_kustomization_uses_only_what_the_renderer_knows(folder: Path) -> None:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= KNOWN_KUSTOMIZE_KEYS
    patches = kustomization.get("patches", [])
    for patch in patches:
        assert set(patch) <= KNOWN_PATCH_KEYS
        assert set(patch.get("target", {})) <= KNOWN_TARGET_KEYS
    listed = {name for name in kustomization["resources"] if not (folder / name).is_dir()}
    listed |= {patch["path"] for patch in patches}
    assert listed == {path.name for path in folder.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_kubectl_renders_the_same_objects(variant: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[variant])],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rendered = [doc for doc in yaml.safe_load_all(out) if doc]

    assert sorted(rendered, key=key) == sorted(RENDERED[variant], key=key)


def test_the_overlay_changes_only_the_settings_and_the_scaling() -> None:
    """So every test of base's workloads, probes and pods holds for the overlay as well."""
    base = {key(obj): obj for obj in OBJECTS}
    overlay = {key(obj): obj for obj in RENDERED["sentinel"]}
    assert overlay.keys() == base.keys()
    changed = {name for name, obj in overlay.items() if obj != base[name]}
    scaled = {name for name in base if name[0] == "ScaledObject"}
    assert changed == {("ConfigMap", "calhook-settings"), *scaled}


def validated() -> list[tuple[str, Manifest]]:
    """Base's objects, and those the overlay changes, but KEDA's (no schema is bundled)."""
    base = {key(obj): obj for obj in OBJECTS}
    changed = [obj for obj in RENDERED["sentinel"] if base.get(key(obj)) != obj]
    return [
        (variant, obj)
        for variant, objects in (("base", OBJECTS), ("sentinel", changed))
        for obj in objects
        if obj["kind"] != "ScaledObject"
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("variant", "obj"),
    validated(),
    ids=[f"{v}:{obj['kind']}/{obj['metadata']['name']}" for v, obj in validated()],
)
def test_every_object_is_valid_for_kubernetes(variant: str, obj: Manifest, version: str) -> None:
    problem = None
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        # Its own message holds the whole schema; the path and the reason are what matter.
        where = "/".join(str(part) for part in exc.absolute_path)
        problem = f"{where}: {exc.message}"
    assert problem is None


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_scaled_objects_are_complete_and_target_a_worker(variant: str) -> None:
    scaled = by_kind("ScaledObject", RENDERED[variant])
    assert scaled
    deployments = by_kind("Deployment", RENDERED[variant])
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1", name
        spec = obj["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "pollingInterval",
            "cooldownPeriod",
            "minReplicaCount",
            "maxReplicaCount",
            "advanced",
            "triggers",
        }, name
        assert spec["scaleTargetRef"]["name"] in deployments, name
        assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment", name
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert spec["triggers"], name
        for trigger in spec["triggers"]:
            assert set(trigger) <= {"type", "metadata", "authenticationRef"}, name
            assert trigger["type"] in KEDA_ADDRESS_KEYS, name
            metadata = trigger["metadata"]
            # KEDA takes metadata as strings only; a bare number is refused at apply time.
            assert all(isinstance(v, str) for v in metadata.values()), name
            assert {"listName", "listLength"} <= set(metadata), name
            assert int(metadata["listLength"]) > 0, name
            assert KEDA_ADDRESS_KEYS[trigger["type"]] & set(metadata), name
            if trigger["type"] == "redis-sentinel":
                assert {"sentinelMaster", "sentinelMasterFromEnv"} & set(metadata), name


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_every_worker_queue_is_scaled_on_its_own_list(variant: str) -> None:
    scaled_lists: dict[str, set[str]] = {}
    for obj in by_kind("ScaledObject", RENDERED[variant]).values():
        target = obj["spec"]["scaleTargetRef"]["name"]
        lists = {t["metadata"]["listName"] for t in obj["spec"]["triggers"]}
        scaled_lists.setdefault(target, set()).update(lists)
    queues = worker_queues(RENDERED[variant])
    assert queues
    for name, consumed in queues.items():
        assert scaled_lists.get(name) == set(consumed), name


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_the_variables_keda_reads_are_in_the_workers_environment(variant: str) -> None:
    deployments = by_kind("Deployment", RENDERED[variant])
    for obj in by_kind("ScaledObject", RENDERED[variant]).values():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        env = container_env(target, RENDERED[variant])
        for trigger in obj["spec"]["triggers"]:
            for name, value in trigger["metadata"].items():
                if name.endswith("FromEnv"):
                    assert value in env, (obj["metadata"]["name"], name)


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_keda_reads_the_redis_and_database_of_redis_url(variant: str) -> None:
    """The servers, master and database KEDA reads are those REDIS_URL names to calhook."""
    deployments = by_kind("Deployment", RENDERED[variant])
    for obj in by_kind("ScaledObject", RENDERED[variant]).values():
        env = container_env(deployments[obj["spec"]["scaleTargetRef"]["name"]], RENDERED[variant])
        for trigger in obj["spec"]["triggers"]:
            read = keda_reads(trigger, env)
            if trigger["type"] == "redis":
                url = urlsplit(env["REDIS_URL"])
                assert read["address"] == f"{url.hostname}:{url.port}"
                assert read["databaseIndex"] == (url.path.strip("/") or "0")
            else:
                # Read by calhook's own parser, as every calhook process reads it.
                target = parse_sentinel(env["REDIS_URL"])
                assert target is not None
                addresses = [address.strip() for address in read["addresses"].split(",")]
                assert addresses == [f"{host}:{port}" for host, port in target.sentinels]
                assert read["sentinelMaster"] == target.master_name
                assert read["databaseIndex"] == str(target.db)


def test_the_sentinel_overlay_scales_every_queue_through_the_sentinels() -> None:
    objects = RENDERED["sentinel"]
    (settings,) = by_kind("ConfigMap", objects).values()
    assert settings["data"]["REDIS_URL"].startswith("redis+sentinel://")
    for obj in by_kind("ScaledObject", objects).values():
        assert {t["type"] for t in obj["spec"]["triggers"]} == {"redis-sentinel"}


def test_a_worker_deployment_serves_every_queue() -> None:
    load_modules(BUILTIN_MODULES)
    # Every built-in handler, configured or not (it runs where its service is).
    needed = {DISPATCH_QUEUE}
    needed |= {h.queue for h in registry if h.module.startswith("workers")}
    needed |= {h.queue for h, _ in registry.inactive.values() if h.module.startswith("workers")}
    served = {queue for queues in worker_queues().values() for queue in queues}
    assert needed <= served


@pytest.mark.parametrize("name", sorted(workloads()))
def test_commands_are_valid_calhook_invocations(name: str) -> None:
    command = calhook_command(workloads()[name])
    assert command[0] == "calhook", name
    sub = main.get_command(click.Context(main), command[1])
    assert sub is not None, f"{name}: no command {command[1]!r}"
    sub.make_context(command[1], list(command[2:]))  # raises on an unknown option


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
@pytest.mark.parametrize("name", sorted(workloads()))
def test_each_pod_reads_valid_settings_and_nothing_else(
    name: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = RENDERED[variant]
    obj = workloads(objects)[name]
    pod_settings(obj, monkeypatch, objects)  # raises SettingsError on a bad value
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    names = {var["name"] for var in container.get("env", [])}
    for config_map in by_kind("ConfigMap", objects).values():
        names |= set(config_map["data"])
    assert names - keda_variables(objects) <= set(env_names().values())


def test_workers_get_a_longer_grace_than_the_soft_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployments = by_kind("Deployment")
    for name in worker_queues():
        obj = deployments[name]
        soft_s = pod_settings(obj, monkeypatch).soft_shutdown_s
        assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > soft_s, name


def ingress() -> tuple[Manifest, Manifest]:
    (statefulset,) = by_kind("StatefulSet").values()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return statefulset, container


def test_the_ingress_probes_are_routes_of_the_app_on_its_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    statefulset, container = ingress()
    settings = pod_settings(statefulset, monkeypatch)
    routes = {
        (route.method, route.resource.canonical)
        for route in create_app(settings).router.routes()
        if route.resource is not None
    }
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    command = container["command"]
    assert ports["http"] == int(command[command.index("--port") + 1])
    assert ports["admin"] == settings.admin_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert ("GET", get["path"]) in routes, probe
        assert get["port"] == "http", probe


def test_the_ingress_outlasts_its_drain_and_keeps_a_replica_up() -> None:
    statefulset, container = ingress()
    pod = statefulset["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + SHUTDOWN_TIMEOUT_S
    assert statefulset["spec"]["replicas"] >= 2
    (budget,) = by_kind("PodDisruptionBudget").values()
    pods = statefulset["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["selector"]["matchLabels"] == pods
    assert 1 <= budget["spec"]["minAvailable"] < statefulset["spec"]["replicas"]


def test_the_spool_is_on_a_claim_of_its_own_per_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    statefulset, container = ingress()
    spool_dir = pod_settings(statefulset, monkeypatch).spool_dir
    claims = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = [m for m in container["volumeMounts"] if spool_dir.startswith(m["mountPath"] + "/")]
    assert mounts, "the spool is on the container's own file system"
    assert max(mounts, key=lambda m: len(m["mountPath"]))["name"] in claims


def test_one_scheduler_and_one_exporter() -> None:
    commands = {name: calhook_command(obj)[:2] for name, obj in workloads().items()}
    for role in ("scheduler", "exporter"):
        (name,) = [n for n, command in commands.items() if command == ["calhook", role]]
        assert workloads()[name]["spec"]["replicas"] == 1, name


@pytest.mark.parametrize("name", sorted(workloads()))
def test_pods_run_unprivileged_on_a_read_only_root_with_resources(name: str) -> None:
    pod = workloads()[name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The image's user is a name (nobody); runAsNonRoot can only check a number.
    assert pod["securityContext"]["runAsUser"] > 0
    for container in containers(workloads()[name]):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), bound


@pytest.mark.parametrize("variant", sorted(KUSTOMIZATIONS))
def test_secrets_are_referenced_never_kept(variant: str) -> None:
    assert not by_kind("Secret", RENDERED[variant])
    for obj in workloads(RENDERED[variant]).values():
        for container in containers(obj):
            refs = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
            assert refs == {SECRET_NAME}
            # After the ConfigMap, so a key in the Secret (a REDIS_URL with a password) wins.
            assert "secretRef" in container["envFrom"][-1]
