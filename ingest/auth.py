"""Authentication of a delivery by the static secret header Calenso can send."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from calhook.settings import Endpoint
from ingest.errors import Unauthorized


def authenticate(endpoint: Endpoint, headers: Mapping[str, str]) -> None:
    """Raise Unauthorized unless the endpoint's header carries one of its accepted secrets.

    Every secret is compared, in constant time, whatever matched first, so the answer's timing
    tells nothing about which secret or how much of it was right. An endpoint without secrets
    accepts everything; the app only allows that with CALHOOK_ALLOW_UNAUTHENTICATED.
    """
    if not endpoint.secrets:
        return
    presented = headers.get(endpoint.header)
    if presented is None:
        raise Unauthorized(f"missing {endpoint.header} header")
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode them back the same way,
    # so a header that is not UTF-8 is a wrong secret (401), not a crash.
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for secret in endpoint.secrets:
        matched |= hmac.compare_digest(given, secret.get_secret_value().encode("utf-8"))
    if not matched:
        raise Unauthorized(f"{endpoint.header} header does not match an accepted secret")
