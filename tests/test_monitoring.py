"""The monitoring profile: every metric the dashboard and the alert rules use is one the code
exports, and Prometheus scrapes both the ingress and the exporter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import redis
import yaml
from prometheus_client import CollectorRegistry

from calhook.redis_server import RedisServer
from calhook.store.stats import count_outcome
from ingest.metrics import IngressMetrics
from workers.exporter import FleetCollector

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bcalhook_[a-z_]+")
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name the ingress and the exporter produce (with data, so none is empty)."""
    names = {s.name for m in IngressMetrics().registry.collect() for s in m.samples}
    names |= {m.name + suffix for m in IngressMetrics().registry.collect() for suffix in SUFFIXES}
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        count_outcome(client, "audit", "ok", 0.01)
        fleet = CollectorRegistry(auto_describe=False)
        fleet.register(FleetCollector(client, {"audit"}))
        names |= {s.name for m in fleet.collect() for s in m.samples}
        # A gauge's samples bear its family's name; those of a destination that is down (held
        # handlers, breakers, failure groups) have none on an idle fleet, and
        # tests/workers/test_exporter_health.py lays them out.
        names |= {m.name for m in fleet.collect() if m.type == "gauge"}
        client.close()
    return names


def used_names() -> dict[str, set[str]]:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "calhook.json").read_text())
    used: dict[str, set[str]] = {}
    for rule in alerts["groups"][0]["rules"]:
        used[rule["alert"]] = set(METRIC.findall(rule["expr"]))
    for panel in dashboard["panels"]:
        used[panel["title"]] = {n for t in panel["targets"] for n in METRIC.findall(t["expr"])}
    return used


def test_dashboard_and_alerts_use_only_exported_metrics(tmp_path: Path) -> None:
    exported = exported_names(tmp_path)
    for where, names in used_names().items():
        assert names, f"{where} uses no calhook metric"
        assert names <= exported, f"{where}: {sorted(names - exported)} are not exported"


def test_the_alerts_the_operators_asked_for_are_there() -> None:
    assert set(used_names()) >= {
        "CalhookHandlerFailing",
        "CalhookDeadLettersGrowing",
        "CalhookOldestPendingTooOld",
        "CalhookQueueNotConsumed",
        "CalhookSpoolNotEmpty",
        "CalhookBreakerOpen",
        "CalhookHandlerPausedLong",
    }


def test_prometheus_scrapes_the_ingress_and_the_exporter() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}  # fmt: skip
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert targets == {"ingress:9180", "exporter:9108"}
    # The ingress serves /metrics only on its admin listener.
    assert compose["ingress"]["environment"]["CALHOOK_ADMIN_PORT"] == "9180"
    assert compose["exporter"]["command"][-1] == "9108"
    assert "monitoring" in compose["prometheus"]["profiles"]
    mounted = {v.split(":")[0] for v in compose["grafana"]["volumes"]}
    assert {"./deploy/grafana/provisioning", "./deploy/grafana/dashboards"} <= mounted
