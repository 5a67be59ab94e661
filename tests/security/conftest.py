"""Fixtures of the hostile-input tests: the real ingress served once per module on a real port.

Hypothesis runs many examples inside one test call, and a function-scoped fixture is not reset
between them; so these tests talk to an ingress served from a thread for the whole module, over
plain synchronous HTTP (http.client lets a test send header bytes that are not UTF-8), and each
example inspects Redis itself.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from calhook.settings import Settings, load_settings
from ingest.server import listening

# Distinctive secrets, so that any echo of one (or of a good part of one) is unmistakable.
DEFAULT_HEADER = "Authorization"
DEFAULT_SECRETS = ("sec-DEFAULT-7f3a9c1e5b2d-current", "sec-DEFAULT-0d4e8b6a2c9f-rotated")
SHOP_HEADER = "X-Shop-Key"
SHOP_SECRETS = ("sec-SHOP-5c1b9e7d3a0f-current", "sec-SHOP-a2f6c8e0b4d1-next")
# A Standard Webhooks endpoint: whsec_ + base64 of the key ("sec-SIGNED-4b8e1d7c0a3f-key!").
SIGNED_SECRETS = ("whsec_c2VjLVNJR05FRC00YjhlMWQ3YzBhM2Yta2V5IQ==",)
SIGNED_KEY = b"sec-SIGNED-4b8e1d7c0a3f-key!"
ADMIN_TOKEN = "sec-ADMIN-9e3c7a1f5d0b-token"
SECRETS = (*DEFAULT_SECRETS, *SHOP_SECRETS, *SIGNED_SECRETS, ADMIN_TOKEN)
# Each static-secret endpoint: its header and the secrets it accepts.
ENDPOINTS = {
    "default": (DEFAULT_HEADER, DEFAULT_SECRETS),
    "shop": (SHOP_HEADER, SHOP_SECRETS),
}
SIGNED = "signed"

Header = tuple[str, str | bytes]


@dataclass(frozen=True)
class Answer:
    """One HTTP response, raw."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def raw(self) -> bytes:
        """Status line material, headers and body: everything a client can read."""
        lines = [f"{name}: {value}" for name, value in self.headers]
        return "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n\n" + self.body


@dataclass(frozen=True)
class Ingress:
    """The real ingress app, served on 127.0.0.1, with the secrets above."""

    port: int
    spool_dir: Path

    def request(
        self, method: str, path: str, headers: Sequence[Header] = (), body: bytes = b""
    ) -> Answer:
        """Send one request as written (no header added but Host and Content-Length)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if method not in ("GET", "HEAD") or body:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            payload = response.read()
            return Answer(response.status, response.getheaders(), payload)
        finally:
            conn.close()


class ServedIngress:
    """``ingest.server.listening`` (the app with calhook serve's server limits) in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop = asyncio.Event()
        self._served: Future[None] | None = None

    def start(self) -> ServedIngress:
        self._thread.start()
        bound: Future[int] = Future()
        self._served = asyncio.run_coroutine_threadsafe(self._serve(bound), self._loop)
        self.port = bound.result(timeout=30)
        return self

    async def _serve(self, bound: Future[int]) -> None:
        try:
            async with listening(self.settings, "127.0.0.1", 0) as ports:
                bound.set_result(ports.port)
                await self._stop.wait()
        except BaseException as exc:
            if not bound.done():
                bound.set_exception(exc)
            raise

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        if self._served is not None:
            self._served.result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def security_settings(redis_url: str, spool_dir: Path) -> Settings:
    """The test Redis; a default, a named and a Standard Webhooks endpoint; an admin token."""
    return load_settings(
        redis_url=redis_url,
        auth_header=DEFAULT_HEADER,
        auth_secrets=",".join(DEFAULT_SECRETS),
        endpoints={
            "shop": {"header": SHOP_HEADER, "secrets": ",".join(SHOP_SECRETS)},
            SIGNED: {"scheme": "standard-webhooks", "secrets": ",".join(SIGNED_SECRETS)},
        },
        admin_token=ADMIN_TOKEN,
        spool_dir=str(spool_dir),
    )


# The database of the served ingress: no worker of the session reads it, so what the oracle
# sees change there is the ingress's doing alone.
INGRESS_DB = 8


def ingress_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{INGRESS_DB}"


@pytest.fixture
def ingress_db(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the served ingress's database, emptied before the test."""
    client = redis.Redis.from_url(ingress_url(redis_url))
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def ingress(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    """The real ingress, as ``calhook serve`` runs it, on its own database of the test Redis
    (:func:`ingress_db`), on a free port."""
    spool_dir = tmp_path_factory.mktemp("security") / "spool"
    server = ServedIngress(security_settings(ingress_url(redis_url), spool_dir)).start()
    yield Ingress(server.port, spool_dir)
    server.stop()
