"""The admin surfaces: /metrics and /status behind the admin token on the public port, or only
on the admin listener; off without either. /healthz, /readyz and /openapi.json stay open."""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp
import pytest
import redis
from pytest_aiohttp import AiohttpClient

from calhook.settings import Settings, SettingsError
from ingest import create_app
from ingest.server import listening
from tests.conftest import FIXTURES, SECRET

ADMIN = "admin-token-for-tests-42"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
BODY = (FIXTURES / "customer.created.nested.json").read_bytes()


async def test_without_token_or_admin_port_both_are_off(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    client = await aiohttp_client(create_app(make_settings()))

    for path in ("/metrics", "/status"):
        response = await client.get(path, headers={"Authorization": "Bearer "})
        assert response.status == 404
        assert (await response.json())["status"] == "error"
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await client.get(path)).status == 200


async def test_on_the_public_port_they_need_the_bearer_token(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    client = await aiohttp_client(create_app(make_settings(admin_token=ADMIN)))

    refused = [
        await client.get("/metrics"),
        await client.get("/metrics", headers={"Authorization": "Bearer wrong"}),
        await client.get("/metrics", headers={"Authorization": ADMIN[:-1]}),
        await client.get("/metrics", headers={"Authorization": SECRET}),  # the webhook secret
        await client.get(f"/metrics?token={ADMIN}"),  # a token in a URL lands in proxy logs
    ]
    metrics = await client.get("/metrics", headers=BEARER)
    status = await client.get("/status", headers=BEARER)

    assert [r.status for r in refused] == [401] * 5
    for response in refused:
        body = await response.text()
        assert ADMIN not in body
        assert '"error":"unauthorized"' in body
    assert metrics.status == 200
    assert "calhook_ingress_requests_total" in await metrics.text()
    assert status.status == 200


async def test_an_admin_port_serves_them_without_token_and_the_public_port_not_at_all(
    make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    settings = make_settings(admin_token=ADMIN, admin_host="127.0.0.1", admin_port=0)
    async with (
        listening(settings, "127.0.0.1", 0) as bound,
        aiohttp.ClientSession() as http,
    ):
        assert bound.admin_port is not None
        public = f"http://127.0.0.1:{bound.port}"
        admin = f"http://127.0.0.1:{bound.admin_port}"
        posted = await http.post(
            f"{public}/webhooks/calenso", data=BODY, headers={"Authorization": SECRET}
        )
        public_metrics = await http.get(f"{public}/metrics", headers=BEARER)
        public_status = await http.get(f"{public}/status", headers=BEARER)
        admin_metrics = await http.get(f"{admin}/metrics")
        metrics_text = await admin_metrics.text()
        admin_status = await http.get(f"{admin}/status")
        admin_webhook = await http.post(
            f"{admin}/webhooks/calenso", data=BODY, headers={"Authorization": SECRET}
        )
        public_health = await http.get(f"{public}/healthz")

    assert posted.status == 202
    assert (public_metrics.status, public_status.status) == (404, 404)
    assert admin_metrics.status == 200
    # The admin listener shows the public app's own counters.
    assert 'calhook_ingress_requests_total{endpoint="default",status="202"} 1.0' in metrics_text
    assert admin_status.status == 200
    assert admin_webhook.status == 404
    assert public_health.status == 200


def test_an_open_ingress_is_refused_unless_allowed_and_then_warns_at_every_start(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SettingsError, match="no secret configured for endpoint"):
        create_app(make_settings(auth_secrets=""))

    with caplog.at_level(logging.WARNING, logger="calhook.ingest"):
        create_app(make_settings(auth_secrets="", allow_unauthenticated=True))
        create_app(make_settings(auth_secrets="", allow_unauthenticated=True))
        create_app(make_settings(allow_unauthenticated=True))  # has a secret: nothing to warn

    warnings = [r for r in caplog.records if r.getMessage() == "accepting unauthenticated webhooks"]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
