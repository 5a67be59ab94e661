"""``/status``: off without an admin token, refused without it, and rendered in a real headless
Chromium with the queues, outcomes, dead letters and parked events, never a payload."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from calhook.settings import Settings
from calhook.store.health import Health
from calhook.store.pairs import Ending, PairStore
from ingest import create_app
from tests.support.store import accept, dead_letter, end, park, route, start

ADMIN = "admin-test-token"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "status.png"
CRM = "crm.sync_customer"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


@dataclass(frozen=True)
class Laid:
    """The event ids of what :func:`lay_out` put in the store."""

    retried: str
    dead: str
    parked: str


def lay_out(pairs: PairStore) -> Laid:
    """A bit of everything the page shows, reached through the real transitions."""
    # An event waiting for dispatch for 42 s.
    accept(pairs, b'{"n": 1}', received_at=time.time() - 42)
    # One CRM call done, another failed and waits for its retry.
    done, retried = accept(pairs, b'{"n": 2}'), accept(pairs, b'{"n": 3}')
    for event_id in (done, retried):
        route(pairs, event_id, [(CRM, "crm")])
    assert end(pairs, CRM, "crm", Ending(done, "done", "ok", duration_s=0.02)) == "ok"
    retry = Ending(
        retried,
        "retry",
        "retry_scheduled",
        {"error": "CrmUnavailable"},
        delay_s=3600,
        duration_s=1.5,
        error="CrmUnavailable: CRM answered 503",
    )
    assert end(pairs, CRM, "crm", retry) == "ok"
    # A dead letter whose body and error text hold personal data.
    dead = accept(pairs, b'{"email": "anna.muster@example.org"}')
    dead_letter(
        pairs,
        dead,
        CRM,
        "crm",
        error="PermanentError: CRM answered 422: anna.muster@example.org is taken",
    )
    # A type nobody handles.
    parked = accept(pairs, b'{"type": "invoice.paid"}', event_type="invoice.paid")
    park(pairs, parked, "unknown_type", event_type="invoice.paid")
    return Laid(retried, dead, parked)


def lay_out_outage(pairs: PairStore) -> None:
    """The CRM down (its breaker open after five failures, events held) and the mail handler
    paused by an operator, through the real transitions."""
    breaker = {"c": "crm", "h": [CRM], "n": 5, "w": 300_000, "p": 30_000, "m": 900_000}
    ids = []
    for n in range(8):
        event_id = accept(pairs, f'{{"outage": {n}}}'.encode(), received_at=time.time() - 600)
        route(pairs, event_id, [(CRM, "crm"), ("notify.staff", "notify")])
        ids.append(event_id)
    for event_id in ids[:5]:
        failed = Ending(
            event_id, "retry", "retry_scheduled", {"error": "CrmUnavailable"}, delay_s=10,
            error="CrmUnavailable: CRM answered 503: down for maintenance",
            gist="CrmUnavailable: CRM answered 503: down for maintenance", breaker=breaker,
        )  # fmt: skip
        assert end(pairs, CRM, "crm", failed) == "ok"
    Health(pairs.scripts).pause("notify.staff", reason="SMTP relay migration", by="ops")
    assert start(pairs, CRM, ids[5:], "crm") == ["held"] * 3
    assert start(pairs, "notify.staff", ids, "notify") == ["held"] * 8


def tables(page: str) -> dict[str, list[list[str]]]:
    """Each table of the page by its heading: the header row, then the rows, as cell texts."""
    found = {}
    for title, table in re.findall(r"<h2>([^<]+)</h2><table>(.*?)</table>", page, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        found[title] = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S) for row in rows]
    return found


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


async def test_the_page_shows_error_classes_never_error_texts_or_payloads(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    quiet_pairs: PairStore,
    quiet_url: str,
) -> None:
    # Given: a dead letter whose body and error text name a person.
    laid = lay_out(quiet_pairs)
    app = create_app(make_settings(admin_token=ADMIN, redis_url=quiet_url))
    client = await aiohttp_client(app)

    # When ops open the page.
    page = await (await client.get("/status", headers={"Authorization": f"Bearer {ADMIN}"})).text()

    # Then: the page names the failures by id, handler, outcome and error class only; the
    # text stays behind `calhook dlq show` (a browser's view of it is checked below).
    failures = tables(page)["Latest failures"][1:]
    assert {(row[0], row[3], row[4]) for row in failures} == {
        (laid.retried, "retry_scheduled", "CrmUnavailable"),
        (laid.dead, "dead_permanent", "PermanentError"),
    }
    assert "anna.muster" not in page


async def test_every_column_of_the_tables_has_its_heading(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    quiet_pairs: PairStore,
    quiet_url: str,
) -> None:
    # Given: work in every state the page counts.
    laid = lay_out(quiet_pairs)
    app = create_app(make_settings(admin_token=ADMIN, redis_url=quiet_url))
    client = await aiohttp_client(app)

    # When ops open the page.
    page = await client.get("/status", headers={"Authorization": f"Bearer {ADMIN}"})

    # Then: each table has a heading for each of its columns, and the queue table counts pairs.
    shown = tables(await page.text())
    assert set(shown) >= {
        "Queues",
        "Handler outcomes",
        "Latest failures",
        "Latest dead letters",
        "Latest parked events",
    }
    for title, (heading, *rows) in shown.items():
        assert rows, title
        for row in rows:
            assert len(row) == len(heading), (title, heading, row)
    queues = {
        row[0]: dict(zip(shown["Queues"][0], row, strict=True)) for row in shown["Queues"][1:]
    }
    # Counted in pairs: the dispatch waiting, the retry delayed, the dead letter and the parked.
    assert (queues["dispatch"]["ready"], queues["dispatch"]["parked"]) == ("1", "1")
    assert (queues["crm"]["delayed"], queues["crm"]["dead"]) == ("1", "1")
    assert queues["dispatch"]["oldest"] in ("42s", "43s", "44s")
    assert [row[0] for row in shown["Latest dead letters"][1:]] == [f"{laid.dead}.{CRM}"]
    assert [row[0] for row in shown["Latest parked events"][1:]] == [laid.parked]


async def test_a_real_browser_renders_the_page_without_personal_data(
    make_settings: Callable[..., Settings], quiet_pairs: PairStore, quiet_url: str, tmp_path: Path
) -> None:
    browser = chromium()
    laid = lay_out(quiet_pairs)
    lay_out_outage(quiet_pairs)
    app = create_app(make_settings(admin_token=ADMIN, redis_url=quiet_url))
    async with TestClient(TestServer(app)) as client:
        url = f"http://127.0.0.1:{client.port}/status?token={ADMIN}"
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
        dom = await run([*flags, "--dump-dom", url])
        shot = tmp_path / "status.png"
        await run([*flags, f"--screenshot={shot}", "--window-size=1100,1400", url])

    assert "crm.sync_customer" in dom
    assert "retry_scheduled" in dom
    assert f"{laid.dead}.crm.sync_customer" in dom
    assert "PermanentError" in dom
    assert laid.retried in dom
    assert "CrmUnavailable" in dom
    assert "invoice.paid" in dom
    assert "unknown_type" in dom
    assert "anna.muster" not in dom
    # The outage: the CRM's breaker holding its handler, the operator's pause, the group.
    assert "SMTP relay migration" in dom
    assert "down for maintenance" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CALHOOK_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes(shot.read_bytes())


async def run(command: list[str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0
    return out.decode()
