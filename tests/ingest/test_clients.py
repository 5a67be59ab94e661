"""The client IP allow-list, and whose X-Forwarded-For is believed.

Given CALHOOK_ALLOWED_IPS (and maybe CALHOOK_TRUSTED_PROXIES), when a client posts directly or
through proxies, then only an allowed client's event is queued; anyone else gets 403.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from calhook.settings import Settings, SettingsError, networks
from ingest import create_app
from ingest.clients import client_address
from tests.conftest import FIXTURES, SECRET
from tests.ingest.stored import queued_ids

Client = TestClient[Any, Any]
URL = "/webhooks/calenso"
AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
BODY = (FIXTURES / "customer.created.nested.json").read_bytes()
PROXIES = networks(("10.0.0.0/8", "2001:db8:cafe::/48"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("198.51.100.7", [], "198.51.100.7"),
        # Not from a trusted proxy: the header is the client's own word, ignored.
        ("198.51.100.7", ["203.0.113.9"], "198.51.100.7"),
        # From a proxy: the rightmost untrusted hop; what the client prepended is ignored.
        ("10.0.0.2", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.2", ["1.2.3.4, 203.0.113.9, 10.0.0.5"], "203.0.113.9"),
        ("10.0.0.2", ["1.2.3.4, 203.0.113.9", "10.0.0.5"], "203.0.113.9"),  # two header lines
        ("10.0.0.2", ["10.1.1.1, 10.0.0.5"], "10.1.1.1"),  # all proxies: the leftmost
        ("2001:db8:cafe::1", ["2001:db8:beef::9"], "2001:db8:beef::9"),
        ("::ffff:10.0.0.2", [" 203.0.113.9 "], "203.0.113.9"),  # IPv4 on a dual-stack socket
    ],
)
def test_the_client_is_the_first_untrusted_address_from_the_right(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert client_address(peer, forwarded, PROXIES) == ipaddress.ip_address(client)


@pytest.mark.parametrize("forwarded", ["203.0.113.9:443", "unknown", "", "203.0.113.9,,"])
def test_an_unreadable_hop_from_a_proxy_is_no_client(forwarded: str) -> None:
    assert client_address("10.0.0.2", [forwarded], PROXIES) is None


def test_a_network_that_is_not_one_is_named(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError, match=r"^CALHOOK_ALLOWED_IPS: .*'10\.0\.0\.0/33'"):
        make_settings(allowed_ips="127.0.0.1/32, 10.0.0.0/33")


async def post(
    aiohttp_client: AiohttpClient, settings: Settings, forwarded: str | None = None
) -> tuple[int, dict[str, Any]]:
    client = await aiohttp_client(create_app(settings))
    headers = dict(AUTH)
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    response = await client.post(URL, data=BODY, headers=headers)
    return response.status, orjson.loads(await response.read())


async def test_an_allowed_client_is_served_and_another_gets_403(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    allowed = await post(aiohttp_client, make_settings(allowed_ips="127.0.0.0/8"))
    refused = await post(aiohttp_client, make_settings(allowed_ips="192.0.2.0/24,::1/128"))

    assert allowed[0] == 202
    assert refused == (
        403,
        {
            "status": "error",
            "error": "forbidden",
            "detail": "the client address is not allowed to post webhooks",
        },
    )
    assert len(queued_ids(redis_db)) == 1


async def test_a_forwarded_address_counts_only_behind_a_trusted_proxy(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    # The test client connects from 127.0.0.1: here, that is the proxy.
    behind_proxy = make_settings(allowed_ips="192.0.2.0/24", trusted_proxies="127.0.0.1/32")
    no_proxy = make_settings(allowed_ips="192.0.2.0/24")

    forwarded = await post(aiohttp_client, behind_proxy, "192.0.2.44")
    spoofed_left = await post(aiohttp_client, behind_proxy, "192.0.2.44, 198.51.100.1")
    untrusted = await post(aiohttp_client, no_proxy, "192.0.2.44")
    garbage = await post(aiohttp_client, behind_proxy, "192.0.2.44, not-an-ip")

    assert forwarded[0] == 202
    assert spoofed_left[0] == 403
    assert untrusted[0] == 403
    assert garbage == (
        403,
        {
            "status": "error",
            "error": "forbidden",
            "detail": "the client address cannot be determined",
        },
    )
    assert len(queued_ids(redis_db)) == 1


async def test_health_and_openapi_are_not_behind_the_allow_list(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    client = await aiohttp_client(create_app(make_settings(allowed_ips="192.0.2.0/24")))

    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/openapi.json")).status == 200
