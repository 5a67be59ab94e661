"""``/status``: off without an admin token, refused without it, and rendered in a real headless
Chromium with the queues, outcomes, dead letters and parked events, never a payload."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from calhook.messages import Delivery, dispatch_message
from calhook.settings import Settings
from ingest import create_app
from workers.stats import count_outcome, note_failure
from workers.stores import DEAD, PARKED, RecordStore

ADMIN = "admin-test-token"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "status.png"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def lay_out(client: redis.Redis) -> None:
    client.lpush(
        "dispatch", dispatch_message(Delivery("e-1", "{}", "default", time.time() - 42), "x")
    )
    count_outcome(client, "crm.sync_customer", "ok", 0.02)
    count_outcome(client, "crm.sync_customer", "retry_scheduled", 1.5)
    note_failure(client, event_id="01a2-retried", handler="crm.sync_customer", attempt=1,
                 outcome="retry_scheduled", error="CrmUnavailable", at=time.time())  # fmt: skip
    RecordStore(client, DEAD).put(
        "01a2-dead.crm.sync_customer",
        {"handler": "crm.sync_customer", "queue": "crm", "reason": "permanent",
         "error": "PermanentError: CRM answered 422: anna.muster@example.org is taken",
         "attempts": "1", "failed_at": repr(time.time()),
         "body": '{"email": "anna.muster@example.org"}'},
    )  # fmt: skip
    RecordStore(client, PARKED).put(
        "01a2-parked",
        {"type": "invoice.paid", "reason": "unknown_type", "parked_at": repr(time.time())},
    )


async def test_the_page_is_off_without_a_token_and_refused_without_it(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], redis_db: redis.Redis
) -> None:
    off = await aiohttp_client(create_app(make_settings()))
    assert (await off.get("/status")).status == 404

    on = await aiohttp_client(create_app(make_settings(admin_token=ADMIN)))
    assert (await on.get("/status")).status == 401
    assert (await on.get("/status", headers={"Authorization": "Bearer nope"})).status == 401
    page = await on.get("/status", headers={"Authorization": f"Bearer {ADMIN}"})
    assert page.status == 200
    assert "<h2>Queues</h2>" in await page.text()


async def test_a_real_browser_renders_the_page_without_personal_data(
    make_settings: Callable[..., Settings], redis_db: redis.Redis, tmp_path: Path
) -> None:
    browser = chromium()
    lay_out(redis_db)
    app = create_app(make_settings(admin_token=ADMIN))
    async with TestClient(TestServer(app)) as client:
        url = f"http://127.0.0.1:{client.port}/status?token={ADMIN}"
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
        dom = await run([*flags, "--dump-dom", url])
        shot = tmp_path / "status.png"
        await run([*flags, f"--screenshot={shot}", "--window-size=1100,900", url])

    assert "crm.sync_customer" in dom
    assert "retry_scheduled" in dom
    assert "01a2-dead.crm.sync_customer" in dom
    assert "PermanentError" in dom
    assert "01a2-retried" in dom
    assert "CrmUnavailable" in dom
    assert "invoice.paid" in dom
    assert "unknown_type" in dom
    assert "anna.muster" not in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CALHOOK_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes(shot.read_bytes())


async def run(command: list[str]) -> str:
    import asyncio

    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0
    return out.decode()
