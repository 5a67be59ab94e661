"""HubSpot end to end: samples posted to the ingress reach a (fake) HubSpot through a real
worker configured with CALHOOK_CRM_KIND=hubspot; a rate limit is honoured, a delete archives."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from tests.conftest import FIXTURES
from tests.faults.rig import AUTH, rig
from tests.support.fake_hubspot import FakeHubSpot, Fault
from tests.support.waiting import await_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "pat-test-hubspot"
CUSTOMER = "c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34"


async def test_customers_reach_hubspot_once_and_deletes_archive(tmp_path: Path) -> None:
    with FakeHubSpot(TOKEN) as hubspot:
        async with rig(tmp_path) as r:
            r.start_worker(
                CALHOOK_HANDLER_MODULES="workers.tasks.crm",
                CALHOOK_CRM_KIND="hubspot",
                CALHOOK_CRM_URL=hubspot.url,
                CALHOOK_CRM_TOKEN=TOKEN,
            )
            r.start_scheduler()  # the rate-limited call waits in its pair's state until due
            assert r.client is not None
            hubspot.inject(Fault.rate_limited(retry_after_s=1), times=1)

            for name in ("customer.created.nested.json", "customer.deleted.nested.json"):
                body = json.loads((FIXTURES / name).read_text())
                answer = await r.client.post(
                    "/webhooks/calenso", data=orjson.dumps(body), headers=AUTH
                )
                assert answer.status == 202
                if name.startswith("customer.created"):
                    await await_for(
                        lambda: hubspot.contact("calenso_uuid", CUSTOMER) is not None,
                        what="the contact in HubSpot",
                    )
                    contact = hubspot.contact("calenso_uuid", CUSTOMER)
                    assert contact is not None
                    assert contact["properties"]["firstname"] == "Luca"
                    assert contact["properties"]["phone"] == "+41790000142"

            await await_for(
                lambda: hubspot.contact("calenso_uuid", CUSTOMER) is None,
                what="the contact archived",
            )

    upserts = hubspot.calls(method="POST", path="/crm/v3/objects/contacts/batch/upsert")
    assert len(upserts) == 2  # the first was answered 429, the second waited out its Retry-After
    assert upserts[1].at - upserts[0].at >= 0.95
    assert len(hubspot.contacts(archived=True)) == 1
