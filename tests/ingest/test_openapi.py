"""``/openapi.json``: a valid OpenAPI 3.1 document, served without auth, and truthful: every
status the ingress answers is declared, and real answers match their declared schemas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema_rs
import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from schemathesis.specs.openapi.definitions import OPENAPI_31

import ingest.errors
from calhook.settings import Settings
from ingest import create_app
from ingest.errors import IngestError
from ingest.openapi import document
from tests.conftest import FIXTURES, SECRET

Client = TestClient[Any, Any]
BODY = (FIXTURES / "customer.created.nested.json").read_bytes()
AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
WEBHOOKS = ("/webhooks/calenso", "/webhooks/calenso/{endpoint}")


@pytest.fixture
def doc(make_settings: Callable[..., Settings]) -> dict[str, Any]:
    return document(make_settings())


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(doc)
    assert doc["openapi"] == "3.1.0"


def test_every_refusal_the_ingress_can_raise_is_declared_on_the_webhook_paths(
    doc: dict[str, Any],
) -> None:
    refusals = {
        cls.status
        for cls in vars(ingest.errors).values()
        if isinstance(cls, type) and issubclass(cls, IngestError) and cls is not IngestError
    }
    assert refusals >= {401, 403, 404, 408, 413, 415, 422, 431, 503}
    for path in WEBHOOKS:
        declared = {int(s) for s in doc["paths"][path]["post"]["responses"]}
        assert declared >= refusals | {200, 202, 400}, path


async def test_it_is_served_without_auth(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    client = await aiohttp_client(create_app(make_settings()))

    response = await client.get("/openapi.json")

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert await response.json() == orjson.loads(orjson.dumps(document(make_settings())))


def conforms(doc: dict[str, Any], path: str, method: str, status: int, body: bytes) -> None:
    """The answer's status is declared for the operation and its JSON body matches."""
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered undeclared {status}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]})
    validator.validate(orjson.loads(body))


async def test_real_answers_match_the_document(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    settings = make_settings(
        max_body_bytes=4096,
        max_header_bytes=2048,
        endpoints={"shop": {"header": "X-Key", "secrets": "shop-key"}},
    )
    doc = document(settings)
    client = await aiohttp_client(create_app(settings))
    deep = b'{"type": "x", "data": ' + b"[" * 40 + b"]" * 40 + b"}"
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("/webhooks/calenso", BODY, AUTH, 202),
        ("/webhooks/calenso", BODY, AUTH, 200),
        ("/webhooks/calenso", BODY, {}, 401),
        ("/webhooks/calenso", b"{oops", AUTH, 400),
        ("/webhooks/calenso", b"a=b", {**AUTH, "Content-Type": "text/csv"}, 415),
        ("/webhooks/calenso", b"[]", AUTH, 422),
        ("/webhooks/calenso", deep, AUTH, 422),
        ("/webhooks/calenso", b'{"type": "x", "data": {"n": 1e999}}', AUTH, 422),
        ("/webhooks/calenso", b"{" + b" " * 5000 + b"}", AUTH, 413),
        ("/webhooks/calenso", BODY, {**AUTH, "X-Pad": "p" * 1900, "X-Pad2": "q" * 200}, 431),
        ("/webhooks/calenso/nope", BODY, AUTH, 404),
        ("/webhooks/calenso/shop", BODY, {"X-Key": "shop-key"}, 202),
    ]
    for url, body, headers, status in cases:
        response = await client.post(url, data=body, headers=headers)
        assert response.status == status, (url, status, await response.text())
        path = WEBHOOKS[1] if url.count("/") == 3 else WEBHOOKS[0]
        conforms(doc, path, "post", status, await response.read())

    for path in ("/healthz", "/readyz"):
        response = await client.get(path)
        conforms(doc, path, "get", response.status, await response.read())
