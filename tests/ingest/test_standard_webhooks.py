"""Standard Webhooks endpoints: our verifier against the ``standardwebhooks`` package and its
vectors, then the real app: rotation, and every way a signature can be wrong is a 401 with
nothing queued."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from standardwebhooks import Webhook

from calhook.settings import Settings, SettingsError, decode_whsec
from ingest import create_app
from ingest.auth import StandardWebhooks, signature_matches
from ingest.errors import Unauthorized
from tests.conftest import FIXTURES
from tests.ingest.stored import queued_ids

Client = TestClient[Any, Any]
URL = "/webhooks/calenso/relay"
BODY = (FIXTURES / "customer.created.nested.json").read_bytes()
# The package's documented vector (libraries/python/tests of standard-webhooks).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_PAYLOAD = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
VECTOR_WRONG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="
CURRENT = "whsec_" + base64.b64encode(b"calhook-current-signing-key-0001").decode()
PREVIOUS = "whsec_" + base64.b64encode(b"calhook-previous-signing-key-01").decode()
STRANGER = "whsec_" + base64.b64encode(b"somebody-else-s-key").decode()


def keyed(*secrets: str) -> list[hmac.HMAC]:
    return [hmac.new(decode_whsec(s), digestmod=hashlib.sha256) for s in secrets]


def vector_headers(signature: str = VECTOR_SIGNATURE) -> dict[str, str]:
    return {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": signature,
    }


def signed(
    body: bytes, secret: str = CURRENT, at: dt.datetime | None = None, msg_id: str = "msg_1"
) -> dict[str, str]:
    """Headers the ``standardwebhooks`` package signs ``body`` with."""
    at = at or dt.datetime.now(dt.UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
        "Content-Type": "application/json",
    }


def test_the_documented_vector_verifies_and_its_altered_signature_does_not() -> None:
    keys = keyed(VECTOR_SECRET)
    stamp = str(VECTOR_TIMESTAMP).encode()

    assert signature_matches(keys, VECTOR_ID.encode(), stamp, VECTOR_SIGNATURE, VECTOR_PAYLOAD)
    assert not signature_matches(keys, VECTOR_ID.encode(), stamp, VECTOR_WRONG, VECTOR_PAYLOAD)
    assert not signature_matches(keys, b"msg_other", stamp, VECTOR_SIGNATURE, VECTOR_PAYLOAD)
    assert not signature_matches(keys, VECTOR_ID.encode(), stamp, VECTOR_SIGNATURE, b"{}")


def test_the_vector_within_and_outside_five_minutes_of_our_clock() -> None:
    def at(offset_s: float) -> StandardWebhooks:
        return StandardWebhooks(
            [decode_whsec(VECTOR_SECRET)], clock=lambda: VECTOR_TIMESTAMP + offset_s
        )

    for offset in (0, 300, -300):
        verifier = at(offset)
        verifier.before_body(vector_headers())
        verifier.after_body(vector_headers(), VECTOR_PAYLOAD)
    for offset in (301, -301):  # too old, from the future
        with pytest.raises(Unauthorized, match="more than 5 minutes"):
            at(offset).before_body(vector_headers())


def test_several_signatures_one_valid_among_other_versions_and_garbage() -> None:
    # The package's multi-signature case, plus entries a careless parser would choke on.
    header = " ".join(
        [
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v1,not*base64",
            "v1",
            VECTOR_SIGNATURE,
        ]
    )
    keys = keyed(VECTOR_SECRET)
    stamp = str(VECTOR_TIMESTAMP).encode()

    assert signature_matches(keys, VECTOR_ID.encode(), stamp, header, VECTOR_PAYLOAD)
    assert not signature_matches(
        keys, VECTOR_ID.encode(), stamp, header.replace("1OE=", "1OA="), VECTOR_PAYLOAD
    )


def test_the_package_and_our_verifier_agree_both_ways() -> None:
    bodies = [BODY, b"{}", '{"name": "Zoë Müller"}'.encode(), b" " * 3 + BODY]
    ours = StandardWebhooks([decode_whsec(CURRENT)])
    for n, body in enumerate(bodies):
        headers = signed(body, msg_id=f"msg_{n}")
        ours.before_body(headers)
        ours.after_body(headers, body)  # signed by the package, verified by us
        Webhook(CURRENT).verify(body, headers)  # and the package agrees with itself
        with pytest.raises(Unauthorized):
            ours.after_body(headers, body + b" ")

    # Signed by hand the way we verify, verified by the package.
    stamp = str(int(time.time()))
    mac = hmac.new(decode_whsec(CURRENT), f"msg_x.{stamp}.".encode() + BODY, hashlib.sha256)
    ours_signature = "v1," + base64.b64encode(mac.digest()).decode()
    headers = {
        "webhook-id": "msg_x",
        "webhook-timestamp": stamp,
        "webhook-signature": ours_signature,
    }
    Webhook(CURRENT).verify(BODY, headers)


def test_secrets_must_be_whsec_base64_and_the_error_does_not_repeat_them(
    make_settings: Callable[..., Settings],
) -> None:
    cases: list[tuple[str, str | None]] = [
        ("plain-old-secret-value", "plain-old"),
        ("whsec_***not-base64***", "***not-base64***"),
        ("whsec_", None),  # empty: nothing to repeat
    ]
    for secret, distinctive in cases:
        endpoints = {"relay": {"scheme": "standard-webhooks", "secrets": secret}}
        with pytest.raises(SettingsError, match=r"^CALHOOK_ENDPOINTS: ") as caught:
            make_settings(endpoints=endpoints)
        if distinctive is not None:
            assert distinctive not in str(caught.value)

    decoded = decode_whsec(VECTOR_SECRET.removesuffix("="))
    assert decoded == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


@pytest.fixture
async def relay(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> Client:
    endpoints = {"relay": {"scheme": "standard-webhooks", "secrets": f"{CURRENT},{PREVIOUS}"}}
    return await aiohttp_client(create_app(make_settings(endpoints=endpoints)))


def queued(redis_db: redis.Redis) -> int:
    return len(queued_ids(redis_db))


async def test_signed_by_either_secret_is_accepted_for_rotation(
    relay: Client, redis_db: redis.Redis
) -> None:
    current = await relay.post(URL, data=BODY, headers=signed(BODY, CURRENT))
    previous = await relay.post(URL, data=BODY + b"\n", headers=signed(BODY + b"\n", PREVIOUS))

    assert (current.status, previous.status) == (202, 202)
    assert queued(redis_db) == 2


def _minutes(n: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(minutes=n)


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


@pytest.mark.parametrize(
    ("make_headers", "expected"),
    [
        (lambda: signed(BODY, STRANGER), "webhook-signature header does not match"),
        (lambda: signed(BODY + b" "), "webhook-signature header does not match"),  # other body
        (lambda: signed(BODY, at=_minutes(-6)), "webhook-timestamp header is more than 5 min"),
        (lambda: signed(BODY, at=_minutes(6)), "webhook-timestamp header is more than 5 min"),
        (lambda: {**signed(BODY), "webhook-timestamp": "soon"}, "webhook-timestamp header is not"),
        (lambda: {**signed(BODY), "webhook-timestamp": "1e9"}, "webhook-timestamp header is not"),
        (lambda: {**signed(BODY), "webhook-id": "msg_other"}, "webhook-signature header does not"),
        (lambda: _without(signed(BODY), "webhook-id"), "missing webhook-id header"),
        (lambda: _without(signed(BODY), "webhook-timestamp"), "missing webhook-timestamp header"),
        (lambda: _without(signed(BODY), "webhook-signature"), "missing webhook-signature header"),
        (lambda: {"Authorization": CURRENT}, "missing webhook-id, webhook-timestamp, webhook-sig"),
    ],
)
async def test_a_wrong_stale_future_or_missing_signature_is_401_and_nothing_is_queued(
    relay: Client,
    redis_db: redis.Redis,
    make_headers: Callable[[], dict[str, str]],
    expected: str,
) -> None:
    response = await relay.post(URL, data=BODY, headers=make_headers())

    assert response.status == 401
    payload = orjson.loads(await response.read())
    assert (payload["status"], payload["error"]) == ("error", "unauthorized")
    assert payload["detail"].startswith(expected), payload["detail"]
    assert CURRENT.removeprefix("whsec_") not in await response.text()
    assert queued(redis_db) == 0


async def test_the_default_endpoint_keeps_its_static_secret(
    relay: Client, redis_db: redis.Redis
) -> None:
    signature_only = await relay.post("/webhooks/calenso", data=BODY, headers=signed(BODY))

    assert signature_only.status == 401
    assert queued(redis_db) == 0
