"""``/status`` on the day a destination is down: held handlers, open breakers and failure groups,
laid out through the store's real transitions, with no personal data of the failing events."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from pytest_aiohttp import AiohttpClient

from calhook.privacy import scrub
from calhook.settings import Settings
from calhook.store.health import Health
from calhook.store.pairs import Ending, PairStore
from ingest import create_app
from tests.support.store import accept, end, route, start

ADMIN = "admin-test-token"
CRM, MAIL = "crm.sync_customer", "notify.email"
EMAIL = "anna.muster@example.org"
BREAKER = {"c": "hubspot", "h": [CRM], "n": 3, "w": 60_000, "p": 30_000, "m": 120_000}
ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def section(page: str, title: str) -> str:
    """The HTML of one section of the page: from its heading to the next."""
    found = re.search(rf"<h2>{re.escape(title)}</h2>(.*?)(?=<h2>|<p><small>)", page, re.S)
    assert found, title
    return found.group(1)


def rows(html: str) -> list[list[str]]:
    """Every row of every table in ``html``, as cell texts (headers included)."""
    found = re.findall(r"<tr>(.*?)</tr>", html, re.S)
    return [re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S) for row in found]


async def open_page(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings], url: str
) -> str:
    client = await aiohttp_client(create_app(make_settings(admin_token=ADMIN, redis_url=url)))
    answer = await client.get("/status", headers={"Authorization": f"Bearer {ADMIN}"})
    assert answer.status == 200
    return await answer.text()


def lay_out(pairs: PairStore) -> None:
    """A CRM whose breaker opened after three failures quoting a customer's e-mail address, and
    a mail handler an operator paused with two events held."""
    health = Health(pairs.scripts)
    error = f"CrmUnavailable: HubSpot answered 503 for {EMAIL}"
    for i in range(4):
        event_id = accept(pairs, f'{{"email": "{EMAIL}", "n": {i}}}'.encode())
        route(pairs, event_id, [(CRM, "crm")])
        if i < 3:
            ending = Ending(
                event_id,
                "retry",
                "retry_scheduled",
                delay_s=3600.0,
                error=error,
                gist=scrub(error),
                breaker=BREAKER,
            )
            assert end(pairs, CRM, "crm", ending) == "ok"
        else:
            assert start(pairs, CRM, [event_id], "crm") == ["held"]
    health.pause(MAIL, reason="SMTP relay maintenance", by="ops")
    for _ in range(2):
        event_id = accept(pairs, b"{}", received_at=time.time() - 600)
        route(pairs, event_id, [(MAIL, "notify")])
        assert start(pairs, MAIL, [event_id], "notify") == ["held"]


async def test_the_page_shows_held_handlers_breakers_and_failure_groups_without_personal_data(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    quiet_pairs: PairStore,
    quiet_url: str,
) -> None:
    # Given: a breaker open on the CRM, a paused mail handler, a group of failures whose error
    # text named a customer
    lay_out(quiet_pairs)

    # When ops open the page
    page = await open_page(aiohttp_client, make_settings, quiet_url)

    # Then: who holds what, since when, how many events and how old the oldest
    held = section(page, "Held handlers and breakers")
    holds, breakers = (rows(t) for t in re.findall(r"<table>.*?</table>", held, re.S))
    assert holds[0] == ["handler", "by", "reason", "since", "held", "oldest"]
    by_handler = {row[0]: row for row in holds[1:]}
    assert by_handler[CRM][1:3] == ["breaker:hubspot", "3 failures in a row (CrmUnavailable)"]
    assert by_handler[CRM][4] == "2"  # the failure that opened it, and the event after
    assert by_handler[MAIL][1:3] == ["ops", "SMTP relay maintenance"]
    assert by_handler[MAIL][4:] == ["2", "10m"]
    assert breakers[0] == ["circuit", "state", "handlers", "failures", "error", "next probe"]
    assert breakers[1][:5] == ["hubspot", "open", CRM, "3", "CrmUnavailable"]
    assert breakers[1][5] in ("29s", "30s")
    # And the open failure group, with its scrubbed message
    groups = rows(section(page, "Failure groups"))
    assert groups[0][1:6] == ["handler", "error", "reason", "state", "count"]
    assert [row[1:6] for row in groups[1:]] == [[CRM, "CrmUnavailable", "transient", "open", "3"]]
    assert groups[1][-1] == "CrmUnavailable: HubSpot answered 503 for a***@e***.org"
    # And no address of the failing events, whole or in part
    assert EMAIL not in page
    assert "anna.muster" not in page
    assert ADDRESS.findall(page) == []


async def test_nothing_held_and_no_failure_is_said_calmly(
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    quiet_pairs: PairStore,
    quiet_url: str,
) -> None:
    page = await open_page(aiohttp_client, make_settings, quiet_url)
    assert section(page, "Held handlers and breakers") == (
        "<p class=empty>none: every handler runs</p>\n"
    )
    assert section(page, "Failure groups") == "<p class=empty>none open</p>\n"
