"""``calhook serve`` applies the server-level settings: a real process, real sockets.

Given CALHOOK_HEADER_TIMEOUT_S, CALHOOK_MAX_HEADERS and CALHOOK_ADMIN_PORT in the environment,
when `calhook serve` runs, then a slow head is cut off, too many headers are refused, and the
metrics are on the admin port only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from calhook.redis_server import free_port
from tests.conftest import FIXTURES, ROOT, SECRET
from tests.ingest.wire import closed_by_server, exchange, head
from tests.support.waiting import wait_for

BODY = (FIXTURES / "customer.created.nested.json").read_bytes()


def answers(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 (http://127.0.0.1)
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def served(redis_url: str, redis_db: redis.Redis, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A `calhook serve` process with tight server limits and an admin port: (public, admin)."""
    port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CALHOOK_AUTH_SECRETS": SECRET,
        "CALHOOK_SPOOL_DIR": str(tmp_path / "spool"),
        "CALHOOK_HEADER_TIMEOUT_S": "0.5",
        "CALHOOK_MAX_HEADERS": "16",
        "CALHOOK_ADMIN_PORT": str(admin_port),
        "CALHOOK_ADMIN_TOKEN": "unused-with-an-admin-port",
    }
    log_path = tmp_path / "ingress.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "calhook", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stderr=log,
        )
    ready = f"http://127.0.0.1:{port}/readyz"
    wait_for(lambda: process.poll() is not None or answers(ready) == 200, what="the ingress")
    assert process.poll() is None, log_path.read_text()
    yield port, admin_port
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log_path.read_text()


async def test_serve_applies_the_server_limits_and_the_admin_port(
    served: tuple[int, int], redis_db: redis.Redis
) -> None:
    port, admin_port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(len(BODY))[:40])  # and then nothing more
    await writer.drain()
    cut_off = await closed_by_server(reader, timeout_s=5)
    writer.close()
    too_many = await exchange(port, head(len(BODY), *[f"X-N-{n}: 1" for n in range(20)]) + BODY)
    accepted = await exchange(port, head(len(BODY)) + BODY)
    public_metrics = await asyncio.to_thread(answers, f"http://127.0.0.1:{port}/metrics")
    admin_metrics = await asyncio.to_thread(answers, f"http://127.0.0.1:{admin_port}/metrics")

    assert cut_off == b""
    assert too_many.status == 400
    assert accepted.status == 202
    assert (public_metrics, admin_metrics) == (404, 200)
