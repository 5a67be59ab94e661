"""The ingress keeps the contract it publishes at ``/openapi.json`` (issue 7), checked by
schemathesis against a real ``calhook serve`` on a free port with the test Redis.

Given the document the running ingress serves; when schemathesis sends what that document
allows (and, in negative mode, what it forbids), with and without valid credentials; then no
answer is a 5xx, every status is a declared one, and every answer matches its declared content
type, headers and schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import event, given
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from calhook.redis_server import free_port
from tests.ingest.stored import queued_ids
from tests.security._strategies import budget
from tests.security.conftest import (
    ADMIN_TOKEN,
    DEFAULT_HEADER,
    DEFAULT_SECRETS,
    SHOP_HEADER,
    SHOP_SECRETS,
    SIGNED,
    SIGNED_SECRETS,
)
from tests.support.worker import CalhookProcess

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
ADMIN_PATHS = ("/metrics", "/status")


class ServeProcess(CalhookProcess):
    """``calhook serve`` on its own port."""

    ready_marker = "ingress listening"


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real ``calhook serve`` with the security tests' endpoints and secrets."""
    root = tmp_path_factory.mktemp("openapi")
    port = free_port()
    endpoints = {
        "shop": {"header": SHOP_HEADER, "secrets": ",".join(SHOP_SECRETS)},
        SIGNED: {"scheme": "standard-webhooks", "secrets": ",".join(SIGNED_SECRETS)},
    }
    process = ServeProcess(
        ["serve", "--host", "127.0.0.1", "--port", str(port)],
        redis_url,
        root / "serve.log",
        CALHOOK_AUTH_HEADER=DEFAULT_HEADER,
        CALHOOK_AUTH_SECRETS=",".join(DEFAULT_SECRETS),
        CALHOOK_ENDPOINTS=json.dumps(endpoints),
        CALHOOK_ADMIN_TOKEN=ADMIN_TOKEN,
        CALHOOK_SPOOL_DIR=str(root / "spool"),
    )
    process.start()
    yield f"http://127.0.0.1:{port}"
    process.stop()


@pytest.fixture(scope="module")
def ingress_schema(served: str) -> OpenApiSchema:
    """The document the running ingress serves, loaded by schemathesis."""
    return schemathesis.openapi.from_url(f"{served}/openapi.json")


def credentials(case: Case[Any]) -> dict[str, Any]:
    """Valid credentials for the operation: the admin token, or the endpoints' secrets."""
    if case.path in ADMIN_PATHS:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return {DEFAULT_HEADER: DEFAULT_SECRETS[0], SHOP_HEADER: SHOP_SECRETS[0]}


# schemathesis.pytest's own parametrization reads pytest internals that pytest 9 removed
# (Function._nodeid); the cases are drawn from schemathesis's strategy with plain hypothesis.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_answers_with_credentials_keep_the_published_contract(
    ingress_schema: OpenApiSchema, served: str, mode: GenerationMode
) -> None:
    @budget(local=25, ci=250)
    @given(case=ingress_schema.as_strategy(mode))
    def run(case: Case[Any]) -> None:
        if case.path == "/webhooks/calenso/{endpoint}" and isinstance(case.path_parameters, dict):
            # Mostly the configured endpoints, sometimes whatever schemathesis made up.
            name = str(case.path_parameters.get("endpoint", ""))
            case.path_parameters["endpoint"] = ["shop", SIGNED, name][len(name) % 3]
        response = case.call_and_validate(base_url=served, headers=credentials(case), checks=CHECKS)
        event(f"{case.method} {case.path} {response.status_code}")

    run()


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_answers_without_credentials_keep_the_published_contract(
    ingress_schema: OpenApiSchema, served: str, redis_db: redis.Redis, mode: GenerationMode
) -> None:
    @budget(local=25, ci=250)
    @given(case=ingress_schema.as_strategy(mode))
    def run(case: Case[Any]) -> None:
        for name in list(case.headers or {}):
            if name.lower() in (DEFAULT_HEADER.lower(), SHOP_HEADER.lower()):
                del case.headers[name]
        response = case.call_and_validate(base_url=served, checks=CHECKS)
        event(f"{case.method} {case.path} {response.status_code}")

        if case.method.upper() == "POST" or case.path in ADMIN_PATHS:
            # Nothing authenticated it: refused (or no such endpoint, or a parser refusal).
            assert response.status_code in (400, 401, 404, 413, 431), response.text
        assert queued_ids(redis_db) == []

    run()
