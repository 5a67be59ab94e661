"""The exporter's gauges of the day a destination is down: held handlers and held events, open
breakers, failure groups; read from Redis at each scrape, laid out by the real transitions."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry

from calhook.store.health import Health
from calhook.store.pairs import Ending, PairStore
from tests.support.store import accept, dead_letter, end, route, start
from workers.exporter import FleetCollector

CRM, MAIL, AUDIT = "crm.sync_customer", "notify.email", "audit.log"
BREAKER = {"c": "hubspot", "h": [CRM], "n": 3, "w": 60_000, "p": 30_000, "m": 120_000}


def scrape(client: redis.Redis) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client, {"crm", "notify", "audit"}))
    return registry


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of metric ``name``, by its labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == name
    }


def test_holds_breakers_and_failure_groups_are_gauges(
    quiet_pairs: PairStore, quiet_db: redis.Redis
) -> None:
    # Given: three transient failures opened the CRM's breaker, which holds one more event
    health = Health(quiet_pairs.scripts)
    for i in range(4):
        event_id = accept(quiet_pairs, f'{{"n": {i}}}'.encode())
        route(quiet_pairs, event_id, [(CRM, "crm")])
        if i < 3:
            ending = Ending(
                event_id,
                "retry",
                "retry_scheduled",
                delay_s=3600.0,
                error="CrmUnavailable: HubSpot answered 503",
                gist="CrmUnavailable: HubSpot answered 503",
                breaker=BREAKER,
            )
            assert end(quiet_pairs, CRM, "crm", ending) == "ok"
        else:
            assert start(quiet_pairs, CRM, [event_id], "crm") == ["held"]
    # an operator paused the mail handler with two events held
    health.pause(MAIL, reason="SMTP relay maintenance", by="ops")
    for _ in range(2):
        event_id = accept(quiet_pairs)
        route(quiet_pairs, event_id, [(MAIL, "notify")])
        assert start(quiet_pairs, MAIL, [event_id], "notify") == ["held"]
    # and a permanent failure of the audit handler was acknowledged
    dead_letter(quiet_pairs, accept(quiet_pairs), AUDIT, "audit", error="AuditRejected: 400")
    (audit,) = [g for g in health.groups() if g.handler == AUDIT]
    health.acknowledge(audit.id, by="ops")

    # When Prometheus scrapes the exporter
    registry = scrape(quiet_db)

    # Then each handler held is 1, by operator or breaker (never who), with its held events
    assert samples(registry, "calhook_handler_held") == {
        (("by", "breaker"), ("handler", CRM)): 1.0,
        (("by", "operator"), ("handler", MAIL)): 1.0,
    }
    assert samples(registry, "calhook_held_events") == {
        (("handler", CRM),): 2.0,  # the failure that opened it, and the event after
        (("handler", MAIL),): 2.0,
    }
    assert samples(registry, "calhook_breaker_open") == {
        (("circuit", "hubspot"), ("state", "open")): 1.0
    }
    # And the groups counted by state; the failures of the open ones
    assert samples(registry, "calhook_failure_groups") == {
        (("handler", AUDIT), ("reason", "permanent"), ("state", "acknowledged")): 1.0,
        (("handler", CRM), ("reason", "transient"), ("state", "open")): 1.0,
    }
    assert samples(registry, "calhook_failure_group_failures") == {
        (("error", "CrmUnavailable"), ("handler", CRM), ("reason", "transient")): 3.0
    }

    # When the mail handler is resumed (its events not released yet) and the group resolved
    health.resume(MAIL)
    health.resolve(audit.id)
    registry = scrape(quiet_db)

    # Then it is no longer held, its events still are, and the group is gone
    assert samples(registry, "calhook_handler_held") == {(("by", "breaker"), ("handler", CRM)): 1.0}
    assert samples(registry, "calhook_held_events")[(("handler", MAIL),)] == 2.0
    assert (("handler", AUDIT), ("reason", "permanent"), ("state", "acknowledged")) not in (
        samples(registry, "calhook_failure_groups")
    )


def test_nothing_held_exports_no_series(quiet_db: redis.Redis) -> None:
    registry = scrape(quiet_db)
    for name in (
        "calhook_handler_held",
        "calhook_held_events",
        "calhook_breaker_open",
        "calhook_failure_groups",
        "calhook_failure_group_failures",
    ):
        assert samples(registry, name) == {}, name
