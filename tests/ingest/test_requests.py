"""The ingress contract (DESIGN.md): statuses and JSON errors, auth, dedup, durable enqueue.

Given the real app on a real Redis (no worker), when a request arrives, then it gets the
documented answer, and only accepted events are on the dispatch queue.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from calhook.settings import Settings, SettingsError
from ingest import create_app
from tests.conftest import FIXTURES, SECRET
from tests.ingest.stored import dispatch_messages, queued

URL = "/webhooks/calenso"
AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
BODY = (FIXTURES / "customer.created.nested.json").read_bytes()

Client = TestClient[Any, Any]


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    redis_db: redis.Redis,
) -> Client:
    return await aiohttp_client(create_app(make_settings(max_body_bytes=4096)))


async def error_of(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    payload = await response.json()
    assert payload["status"] == "error"
    return f"{payload['error']}: {payload['detail']}"


async def test_accepted_event_is_queued_for_dispatch(client: Client, redis_db: redis.Redis) -> None:
    response = await client.post(URL, data=BODY, headers=AUTH)

    assert response.status == 202
    answer = await response.json()
    assert answer["status"] == "accepted"
    [(task, args, kwargs, headers)] = dispatch_messages(redis_db)
    assert task == "calhook.dispatch"
    assert args == []
    assert kwargs["ids"] == [answer["event_id"]]
    assert headers["id"] == f"dispatch.{kwargs['seq']}"
    # The body is stored once, beside the event's dispatch state, and the message names it by
    # id: Flower, Celery's logs (argsrepr/kwargsrepr) and the queue hold no personal data.
    [event] = queued(redis_db)
    assert (event.body, event.endpoint, event.type) == (BODY, "default", "customer.created")
    assert event.dispatch == "queued"
    raw = redis_db.lindex("dispatch", 0)
    assert isinstance(raw, bytes)
    assert b"luca" not in raw.lower()
    assert "luca" not in headers["kwargsrepr"].lower()


async def test_event_ids_are_sortable_uuid7(client: Client) -> None:
    ids = []
    for n in range(5):
        body = BODY.replace(b"09:12:46", f"09:12:{n:02d}".encode())
        response = await client.post(URL, data=body, headers=AUTH)
        ids.append((await response.json())["event_id"])

    assert ids == sorted(ids)
    assert all(i[14] == "7" for i in ids)


async def test_retransmission_of_same_bytes_is_a_duplicate(
    client: Client, redis_db: redis.Redis
) -> None:
    first = await (await client.post(URL, data=BODY, headers=AUTH)).json()

    again = await client.post(URL, data=BODY, headers=AUTH)

    assert again.status == 200
    assert await again.json() == {"status": "duplicate", "event_id": first["event_id"]}
    assert len(queued(redis_db)) == 1
    [key] = redis_db.keys("calhook:dedup:*")
    assert 86_400 < int(redis_db.ttl(key)) <= 48 * 3600


async def test_same_event_with_other_bytes_is_not_a_duplicate(
    client: Client, redis_db: redis.Redis
) -> None:
    compact = orjson.dumps(orjson.loads(BODY))

    a = await client.post(URL, data=BODY, headers=AUTH)
    b = await client.post(URL, data=compact, headers=AUTH)

    assert (a.status, b.status) == (202, 202)
    assert len(queued(redis_db)) == 2


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "unauthorized: missing Authorization header"),
        ({"Authorization": "wrong"}, "unauthorized: Authorization header does not match"),
        ({"Authorization": SECRET + "x"}, "unauthorized: Authorization header does not match"),
        ({"X-Other": SECRET}, "unauthorized: missing Authorization header"),
    ],
)
async def test_missing_or_wrong_secret_is_401(
    client: Client, redis_db: redis.Redis, headers: dict[str, str], expected: str
) -> None:
    response = await client.post(URL, data=BODY, headers=headers)

    assert (await error_of(response, 401)).startswith(expected)
    assert SECRET not in await response.text()
    assert queued(redis_db) == []


async def test_any_of_several_secrets_is_accepted_for_rotation(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth_secrets="old-one, new-one")))

    old = await client.post(URL, data=BODY, headers={"Authorization": "old-one"})
    new = await client.post(URL, data=BODY + b" ", headers={"Authorization": "new-one"})
    neither = await client.post(URL, data=BODY, headers={"Authorization": "old-one,new-one"})

    assert (old.status, new.status, neither.status) == (202, 202, 401)


async def test_named_endpoint_has_its_own_header_and_secrets(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    endpoints = {"shop": {"header": "Ocp-Apim-Subscription-Key", "secrets": "shop-key"}}
    client = await aiohttp_client(create_app(make_settings(endpoints=endpoints)))

    ok = await client.post(
        f"{URL}/shop", data=BODY, headers={"Ocp-Apim-Subscription-Key": "shop-key"}
    )
    default_secret = await client.post(f"{URL}/shop", data=BODY, headers=AUTH)
    unknown = await client.post(f"{URL}/nope", data=BODY, headers=AUTH)

    assert ok.status == 202
    assert (await error_of(default_secret, 401)).startswith("unauthorized")
    assert (await error_of(unknown, 404)) == "unknown_endpoint: no endpoint named 'nope'"
    [event] = queued(redis_db)
    assert event.endpoint == "shop"


async def test_refuses_to_start_without_a_secret(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError, match="no secret configured for endpoint"):
        create_app(make_settings(auth_secrets=""))

    create_app(make_settings(auth_secrets="", allow_unauthenticated=True))


async def test_too_large_body_is_413(client: Client, redis_db: redis.Redis) -> None:
    big = orjson.dumps({"type": "customer.created", "data": {"pad": "x" * 5000}})

    declared = await client.post(URL, data=big, headers=AUTH)

    async def chunks() -> Any:
        yield big[:3000]
        yield big[3000:]

    streamed = await client.post(URL, data=chunks(), headers=AUTH)

    assert (await error_of(declared, 413)).startswith("body_too_large")
    assert (await error_of(streamed, 413)).startswith("body_too_large")
    assert queued(redis_db) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "expected"),
    [
        (b"type=customer.created", "application/x-www-form-urlencoded", 415, "unsupported_media"),
        (b"{not json", "application/json", 400, "malformed_json: body is not valid JSON"),
        (b"", "application/json", 400, "malformed_json"),
        (b"[1, 2]", "application/json", 422, "invalid_envelope"),
        (b'{"type": 5, "data": {}}', "application/json", 422, "invalid_envelope"),
        (b'{"data": {}}', "application/json", 422, "invalid_envelope"),
        (b'{"type": "customer.created", "data": []}', "application/json", 422, "invalid_envelope"),
        (b'{"type": "customer.created"}', "application/json", 422, "invalid_envelope"),
    ],
)
async def test_unusable_body_gets_a_json_error_naming_the_problem(
    client: Client,
    redis_db: redis.Redis,
    body: bytes,
    content_type: str,
    status: int,
    expected: str,
) -> None:
    response = await client.post(
        URL, data=body, headers={"Authorization": SECRET, "Content-Type": content_type}
    )

    assert (await error_of(response, status)).startswith(expected)
    assert queued(redis_db) == []


async def test_envelope_error_names_the_field(client: Client) -> None:
    response = await client.post(URL, data=b'{"type": 5, "data": {}}', headers=AUTH)

    assert "type" in await error_of(response, 422)


async def test_json_body_is_accepted_whatever_its_declared_type(
    client: Client, redis_db: redis.Redis
) -> None:
    response = await client.post(
        URL, data=BODY, headers={"Authorization": SECRET, "Content-Type": "text/plain"}
    )

    assert response.status == 202
    assert len(queued(redis_db)) == 1


async def test_unknown_type_and_bad_payload_are_accepted_not_refused(
    client: Client, redis_db: redis.Redis
) -> None:
    unknown = orjson.dumps({"type": "invoice.paid", "created": "2025-01-01 00:00:00", "data": {}})
    bad = orjson.dumps({"type": "customer.created", "created": "yesterday", "data": {}})

    a = await client.post(URL, data=unknown, headers=AUTH)
    b = await client.post(URL, data=bad, headers=AUTH)

    assert (a.status, b.status) == (202, 202)
    assert len(queued(redis_db)) == 2


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["redis"] == "ok"


async def test_unreachable_redis_spools_and_readiness_says_so(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings]
) -> None:
    from calhook.redis_server import free_port

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await aiohttp_client(create_app(settings))

    posted = await client.post(URL, data=BODY, headers=AUTH)
    ready = await client.get("/readyz")

    assert posted.status == 202
    state = await ready.json()
    assert ready.status == 200
    assert state["redis"] == "unavailable"
    assert (state["spooling"], state["spool_depth"]) == (True, 1)


async def test_redis_and_spool_both_down_is_503(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from calhook.redis_server import free_port

    spool = tmp_path / "spool"
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", spool_dir=str(spool))
    client = await aiohttp_client(create_app(settings))
    for slot in spool.iterdir():  # the disk goes away under the running ingress
        shutil.rmtree(slot)
        slot.write_text("not a directory")

    posted = await client.post(URL, data=BODY, headers=AUTH)

    assert (await error_of(posted, 503)).startswith("unavailable")


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    assert (await error_of(await client.get("/nowhere"), 404)).startswith("Not Found")
    wrong_method = await client.get(URL)
    assert (await error_of(wrong_method, 405)).startswith("Method Not Allowed")
    assert wrong_method.headers["Allow"] == "POST"


async def test_a_secret_header_that_is_not_utf8_is_401_not_a_crash(client: Client) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"POST /webhooks/calenso HTTP/1.1\r\nHost: x\r\nAuthorization: caf\xe9\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(BODY), BODY)
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()

    assert status_line.split()[1] == b"401"


async def test_no_content_type_and_no_json_is_400(client: Client) -> None:
    response = await client.post(
        URL, data=b"{oops", headers={"Authorization": SECRET, "Content-Type": ""}
    )

    assert (await error_of(response, 400)).startswith("malformed_json")


async def test_a_byte_order_mark_and_a_trailing_slash_are_tolerated(
    client: Client, redis_db: redis.Redis
) -> None:
    response = await client.post(URL + "/", data=b"\xef\xbb\xbf" + BODY, headers=AUTH)
    again = await client.post(URL, data=BODY, headers=AUTH)

    assert response.status == 202
    [event] = queued(redis_db)
    # Stored without the mark, as dispatch parses it; the same event without it is a duplicate.
    assert event.body == BODY
    assert orjson.loads(event.body)["type"]
    assert again.status == 200


async def test_metrics_count_requests_and_events_without_personal_data(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    client = await aiohttp_client(create_app(make_settings(admin_token="admin-token")))
    await client.post(URL, data=BODY, headers=AUTH)
    await client.post(URL, data=BODY, headers=AUTH)
    await client.post(URL, data=BODY, headers={"Authorization": "wrong"})
    unknown = orjson.dumps({"type": "x.secret.luca", "created": "2025-01-01 00:00:00", "data": {}})
    await client.post(URL, data=unknown, headers=AUTH)

    response = await client.get("/metrics", headers={"Authorization": "Bearer admin-token"})
    text = await response.text()

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'calhook_ingress_requests_total{endpoint="default",status="202"} 2.0' in text
    assert 'calhook_ingress_requests_total{endpoint="default",status="200"} 1.0' in text
    assert 'calhook_ingress_requests_total{endpoint="default",status="401"} 1.0' in text
    accepted = 'events_total{endpoint="default",outcome="redis",type="customer.created"} 1.0'
    assert accepted in text
    assert 'outcome="duplicate",type="customer.created"} 1.0' in text
    assert 'type="other"} 1.0' in text
    assert "calhook_ingress_spool_depth 0.0" in text
    assert 'calhook_ingress_ack_seconds_count{endpoint="default"} 4.0' in text
    assert "luca" not in text.lower()
