"""The Kubernetes manifests (deploy/kubernetes) are valid, and agree with the code.

The kustomization is rendered here in Python (it uses `namespace`, `resources` and `images`
only, and a test refuses any other key), so no cluster, kubectl or network is needed: every
object is checked against the Kubernetes JSON schemas that kubernetes-validate ships, in strict
mode (an unknown or misplaced field fails). KEDA's ScaledObject is a custom resource with no
bundled schema; its fields are checked one by one. Where kubectl is installed, its own
`kubectl kustomize` must render the same objects as the Python renderer.
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
from calhook.settings import Settings, env_names, load_settings
from ingest.app import create_app
from ingest.server import SHUTDOWN_TIMEOUT_S
from workers.registry import load_modules, registry

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "kubernetes" / "base"
#: The oldest Kubernetes the manifests are meant for, and the newest schemas bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
#: The one Secret the manifests name; people create it, the repository never holds it.
SECRET_NAME = "calhook-secrets"
KNOWN_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet"}

Manifest = dict[str, Any]


def render(folder: Path) -> list[Manifest]:
    """The objects `kubectl kustomize folder` prints, for the keys this project uses."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[Manifest] = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((folder / resource).read_text()) if doc]
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


def containers(obj: Manifest) -> list[Manifest]:
    if obj["kind"] not in WORKLOADS:
        return []
    spec = obj["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


OBJECTS = render(BASE)


def by_kind(kind: str) -> dict[str, Manifest]:
    return {obj["metadata"]["name"]: obj for obj in OBJECTS if obj["kind"] == kind}


def workloads() -> dict[str, Manifest]:
    return {name: obj for kind in WORKLOADS for name, obj in by_kind(kind).items()}


def calhook_command(obj: Manifest) -> list[str]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    command: list[str] = container["command"]
    return command


def worker_queues() -> dict[str, list[str]]:
    """Worker Deployment → the queues of its `-Q`."""
    queues = {}
    for name, obj in by_kind("Deployment").items():
        command = calhook_command(obj)
        if command[:2] == ["calhook", "worker"]:
            queues[name] = command[command.index("-Q") + 1].split(",")
    return queues


def pod_settings(obj: Manifest, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a workload's container reads: the ConfigMap, its env, a stand-in Secret."""
    for name in env_names().values():
        monkeypatch.delenv(name, raising=False)
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    config_maps = by_kind("ConfigMap")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            for key, value in config_maps[source["configMapRef"]["name"]]["data"].items():
                monkeypatch.setenv(key, value)
        else:
            monkeypatch.setenv("CALHOOK_AUTH_SECRETS", "placeholder-from-the-secret")
    for var in container.get("env", []):
        monkeypatch.setenv(var["name"], var["value"])
    return load_settings()


def test_the_kustomization_uses_only_what_the_renderer_knows() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert set(kustomization) <= KNOWN_KUSTOMIZE_KEYS
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_renders_the_same_objects() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    rendered = [doc for doc in yaml.safe_load_all(out) if doc]

    def key(obj: Manifest) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(rendered, key=key) == sorted(OBJECTS, key=key)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "obj",
    [obj for obj in OBJECTS if obj["kind"] != "ScaledObject"],
    ids=lambda obj: f"{obj['kind']}/{obj['metadata']['name']}",
)
def test_every_object_is_valid_for_kubernetes(obj: Manifest, version: str) -> None:
    problem = None
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        # Its own message holds the whole schema; the path and the reason are what matter.
        where = "/".join(str(part) for part in exc.absolute_path)
        problem = f"{where}: {exc.message}"
    assert problem is None


def test_scaled_objects_are_complete_and_target_a_worker() -> None:
    scaled = by_kind("ScaledObject")
    assert scaled
    deployments = by_kind("Deployment")
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
            assert trigger["type"] in ("redis", "redis-sentinel"), name
            metadata = trigger["metadata"]
            # KEDA takes metadata as strings only; a bare number is refused at apply time.
            assert all(isinstance(v, str) for v in metadata.values()), name
            assert {"listName", "listLength"} <= set(metadata), name
            assert int(metadata["listLength"]) > 0, name
            assert {"address", "addressFromEnv", "host", "hostFromEnv"} & set(metadata), name


def test_every_worker_queue_is_scaled_on_its_own_list() -> None:
    scaled_lists: dict[str, set[str]] = {}
    for obj in by_kind("ScaledObject").values():
        target = obj["spec"]["scaleTargetRef"]["name"]
        lists = {t["metadata"]["listName"] for t in obj["spec"]["triggers"]}
        scaled_lists.setdefault(target, set()).update(lists)
    queues = worker_queues()
    assert queues
    for name, consumed in queues.items():
        assert scaled_lists.get(name) == set(consumed), name


def test_the_address_keda_reads_is_in_the_workers_environment() -> None:
    config_maps = by_kind("ConfigMap")
    deployments = by_kind("Deployment")
    for obj in by_kind("ScaledObject").values():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        names = {var["name"] for var in container.get("env", [])}
        for source in container["envFrom"]:
            if "configMapRef" in source:
                names |= set(config_maps[source["configMapRef"]["name"]]["data"])
        for trigger in obj["spec"]["triggers"]:
            if "addressFromEnv" in trigger["metadata"]:
                assert trigger["metadata"]["addressFromEnv"] in names


def test_keda_reads_the_redis_and_database_of_redis_url() -> None:
    (settings,) = by_kind("ConfigMap").values()
    url = urlsplit(settings["data"]["REDIS_URL"])
    database = url.path.strip("/") or "0"
    for obj in by_kind("ScaledObject").values():
        for trigger in obj["spec"]["triggers"]:
            metadata = trigger["metadata"]
            assert settings["data"][metadata["addressFromEnv"]] == f"{url.hostname}:{url.port}"
            assert metadata["databaseIndex"] == database


def test_a_worker_deployment_serves_every_queue() -> None:
    load_modules(Settings.model_fields["handler_modules"].get_default())
    # The CRM and notify handlers register only when configured; their queues are named here.
    needed = {DISPATCH_QUEUE, "crm", "notify"}
    needed |= {h.queue for h in registry if h.fn.__module__.startswith("workers")}
    served = {queue for queues in worker_queues().values() for queue in queues}
    assert needed <= served


@pytest.mark.parametrize("name", sorted(workloads()))
def test_commands_are_valid_calhook_invocations(name: str) -> None:
    command = calhook_command(workloads()[name])
    assert command[0] == "calhook", name
    sub = main.get_command(click.Context(main), command[1])
    assert sub is not None, f"{name}: no command {command[1]!r}"
    sub.make_context(command[1], list(command[2:]))  # raises on an unknown option


@pytest.mark.parametrize("name", sorted(workloads()))
def test_each_pod_reads_valid_settings_and_nothing_else(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = workloads()[name]
    pod_settings(obj, monkeypatch)  # raises SettingsError on a bad value
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    keda_reads = {
        t["metadata"]["addressFromEnv"]
        for so in by_kind("ScaledObject").values()
        for t in so["spec"]["triggers"]
        if "addressFromEnv" in t["metadata"]
    }
    names = {var["name"] for var in container.get("env", [])}
    for config_map in by_kind("ConfigMap").values():
        names |= set(config_map["data"])
    assert names - keda_reads <= set(env_names().values())


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


def test_secrets_are_referenced_never_kept() -> None:
    assert not by_kind("Secret")
    for obj in workloads().values():
        for container in containers(obj):
            refs = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
            assert refs == {SECRET_NAME}
            # After the ConfigMap, so a key in the Secret (a REDIS_URL with a password) wins.
            assert "secretRef" in container["envFrom"][-1]
