"""Authentication of a delivery: Calenso's static secret header, or a Standard Webhooks signature.

Each endpoint gets one authenticator, built once at start-up (secrets encoded, ``whsec_`` keys
decoded and keyed into HMAC objects), so a request pays only for the comparison. A request is
checked in two steps around the body read: ``before_body`` refuses what can be refused from the
headers alone (a wrong static secret, a missing or stale signature header) without reading a
byte of body; ``after_body`` checks what needs the body (the signature). Nothing is enqueued
before both have passed. Errors name the header, never its value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from calhook.settings import Endpoint
from ingest.errors import Unauthorized

#: Standard Webhooks: a signature is accepted this long either side of the receiver's clock.
TOLERANCE_S = 300
SW_ID = "webhook-id"
SW_TIMESTAMP = "webhook-timestamp"
SW_SIGNATURE = "webhook-signature"


def _raw(value: str) -> bytes:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode them back the same way,
    # so a header that is not UTF-8 is a wrong secret (401), not a crash.
    return value.encode("utf-8", "surrogateescape")


class Authenticator(Protocol):
    """What the ingress asks of an endpoint's authentication."""

    def before_body(self, headers: Mapping[str, str]) -> None:
        """Raise Unauthorized for what the headers alone show to be unauthentic."""

    def after_body(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise Unauthorized unless the body is the one the sender authenticated."""


class Unauthenticated:
    """An endpoint without secrets; only allowed with ``CALHOOK_ALLOW_UNAUTHENTICATED``."""

    def before_body(self, headers: Mapping[str, str]) -> None:
        """Accept any headers."""

    def after_body(self, headers: Mapping[str, str], body: bytes) -> None:
        """Accept any body."""


class StaticSecret:
    """Calenso's scheme: one of the accepted secrets, verbatim, in the endpoint's header."""

    def __init__(self, header: str, secrets: Sequence[bytes]) -> None:
        self.header = header
        self._secrets = tuple(secrets)

    def before_body(self, headers: Mapping[str, str]) -> None:
        """Compare the header with every secret in constant time, whatever matched first, so
        the answer's timing tells nothing about which secret or how much of it was right."""
        presented = headers.get(self.header)
        if presented is None:
            raise Unauthorized(f"missing {self.header} header")
        given = _raw(presented)
        matched = False
        for secret in self._secrets:
            matched |= hmac.compare_digest(given, secret)
        if not matched:
            raise Unauthorized(f"{self.header} header does not match an accepted secret")

    def after_body(self, headers: Mapping[str, str], body: bytes) -> None:
        """The secret does not depend on the body."""


def _keyed(keys: Sequence[bytes]) -> tuple[hmac.HMAC, ...]:
    return tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)


def signature_matches(
    keys: Sequence[hmac.HMAC], msg_id: bytes, timestamp: bytes, signatures: str, body: bytes
) -> bool:
    """True when one ``v1,<base64>`` entry of ``signatures`` (space-separated) is the
    HMAC-SHA256 of ``{msg_id}.{timestamp}.{body}`` under one of ``keys``.

    Every entry is compared with every key's digest in constant time; entries of other
    versions or that are not base64 are skipped, as the specification asks.
    """
    expected = []
    for key in keys:
        mac = key.copy()
        mac.update(msg_id + b"." + timestamp + b".")
        mac.update(body)
        expected.append(mac.digest())
    matched = False
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        for digest in expected:
            matched |= hmac.compare_digest(digest, given)
    return matched


class StandardWebhooks:
    """Standard Webhooks (standardwebhooks.com): ``webhook-id``, ``webhook-timestamp`` within
    ±5 minutes, and ``webhook-signature`` over both and the body with a ``whsec_`` secret."""

    def __init__(self, keys: Sequence[bytes], clock: Callable[[], float] = time.time) -> None:
        self._keys = _keyed(keys)
        self._clock = clock

    def before_body(self, headers: Mapping[str, str]) -> None:
        """Refuse missing headers and a timestamp outside the tolerance before the body."""
        missing = [h for h in (SW_ID, SW_TIMESTAMP, SW_SIGNATURE) if not headers.get(h)]
        if missing:
            raise Unauthorized(f"missing {', '.join(missing)} header")
        stamp = headers[SW_TIMESTAMP]
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise Unauthorized(f"{SW_TIMESTAMP} header is not a Unix time in seconds")
        # Both ways: a timestamp from the future is as suspect as a replayed old one.
        if abs(self._clock() - int(stamp)) > TOLERANCE_S:
            raise Unauthorized(f"{SW_TIMESTAMP} header is more than 5 minutes from now")

    def after_body(self, headers: Mapping[str, str], body: bytes) -> None:
        """Refuse a body that no accepted secret signed (with this id and timestamp)."""
        msg_id, stamp = _raw(headers[SW_ID]), headers[SW_TIMESTAMP].encode()
        if not signature_matches(self._keys, msg_id, stamp, headers[SW_SIGNATURE], body):
            raise Unauthorized(f"{SW_SIGNATURE} header does not match an accepted secret")


def authenticator(endpoint: Endpoint) -> Authenticator:
    """The authenticator of ``endpoint``, with its secrets prepared once."""
    if not endpoint.secrets:
        return Unauthenticated()
    if endpoint.scheme == "standard-webhooks":
        return StandardWebhooks(endpoint.signing_keys())
    return StaticSecret(endpoint.header, [_raw(s.get_secret_value()) for s in endpoint.secrets])
