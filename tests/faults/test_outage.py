"""A CRM down for a long stretch, on real processes: the breaker holds, nothing is lost or
dead-lettered, and once the CRM is back every held event reaches it exactly once at its pace.

The retry schedule is compressed to under two seconds: without the breaker every event would be
a dead letter long before the CRM comes back. The notices are read in the stream the notices
loop sends from (``calhook:notices``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from calhook.store.health import Breaker, Health
from calhook.store.keys import DEAD, HELD_STATE, NOTICES
from tests.conftest import FIXTURES
from tests.faults.rig import AUTH, Rig, rig
from tests.support.chat_server import ChatServer
from tests.support.fake_crm import TOKEN, FakeCrm
from tests.support.waiting import await_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EVENTS = 120
RATE = 20
HANDLER = "crm.sync_customer"
CIRCUIT = "crm"
ENV = {
    "CALHOOK_HANDLER_MODULES": "workers.tasks.crm",
    "CALHOOK_CRM_KIND": "http",
    "CALHOOK_CRM_TOKEN": TOKEN,
    "CALHOOK_CRM_RATE_PER_S": str(RATE),
    "CALHOOK_RETRY_SCHEDULE_S": "0.2,0.4,0.8",
    "CALHOOK_QUICK_RETRIES": "0",
    "CALHOOK_BREAKER_FAILURES": "5",
    "CALHOOK_BREAKER_WINDOW_S": "60",
    "CALHOOK_BREAKER_PROBE_S": "1",
    "CALHOOK_BREAKER_PROBE_MAX_S": "2",
    "CALHOOK_RELEASE_RATE_PER_S": str(RATE),
    # Room for the CRM client's quick retries within a batch (the rig's 4 s would cut them).
    "CALHOOK_TASK_TIME_LIMIT_S": "20",
    "CALHOOK_VISIBILITY_TIMEOUT_S": "30",
}


def _customer() -> tuple[str, bytes]:
    body = json.loads((FIXTURES / "customer.created.nested.json").read_text())
    customer = str(uuid.uuid4())
    body["data"]["customer"]["uuid"] = customer
    return customer, orjson.dumps(body)


async def _post(r: Rig, body: bytes) -> str:
    assert r.client is not None
    answer = await r.client.post("/webhooks/calenso", data=body, headers=AUTH)
    assert answer.status == 202, await answer.text()
    return str((await answer.json())["event_id"])


def _notices(r: Rig) -> Counter[str]:
    entries = r.redis.xrange(NOTICES)
    assert entries is not None
    kinds: Counter[str] = Counter()
    for _, f in entries:
        assert f is not None
        kind = f[b"kind"]
        assert isinstance(kind, bytes)
        kinds[kind.decode()] += 1
    return kinds


def _held(r: Rig, ids: list[str]) -> int:
    return sum(r.state(i, HANDLER) == HELD_STATE for i in ids)


async def test_a_long_crm_outage_is_held_and_every_event_lands_once_after(tmp_path: Path) -> None:
    crm = FakeCrm().start()
    chat = ChatServer().start()
    try:
        async with rig(
            tmp_path, CALHOOK_CRM_URL=crm.url, CALHOOK_CHAT_WEBHOOK_URL=chat.url, **ENV
        ) as r:
            health = Health(r.pairs.scripts)
            r.start_worker(concurrency=2)
            r.start_scheduler()
            crm.outage_status = 503
            customers: dict[str, str] = {}
            for _ in range(EVENTS):
                customer, body = _customer()
                customers[await _post(r, body)] = customer
            ids = list(customers)

            # The breaker opens within its window and holds the handler.
            def opened() -> Breaker | None:
                b = health.breaker(CIRCUIT)
                return b if b is not None and b.state != "closed" else None

            breaker = await await_for(opened, what="the breaker to open")
            assert breaker is not None
            assert breaker.failures >= 5
            assert set(breaker.handlers) >= {HANDLER}
            await await_for(lambda: _held(r, ids) >= EVENTS - 1, what="the events held")

            # A long stretch down: probes fail and back off, nothing is dead-lettered. The
            # schedule alone (1.4 s) would have dead-lettered every event many times over.
            before = health.breaker(CIRCUIT)
            assert before is not None
            calls_before = len(crm.calls)
            down_until = time.monotonic() + 12
            while time.monotonic() < down_until:
                assert r.redis.zcard(DEAD) == 0
                b = health.breaker(CIRCUIT)
                assert b is not None
                assert b.state in ("open", "half_open")
                await asyncio.sleep(0.5)
            after = health.breaker(CIRCUIT)
            assert after is not None
            probes = after.probes - before.probes
            assert probes >= 3
            # While open, the CRM sees one handler call per probe (the client's quick retries
            # make each up to 3 requests), and no other.
            assert len(crm.calls) - calls_before <= 3 * (probes + 1), (crm.calls, probes)
            (group,) = health.groups()
            assert (group.handler, group.error, group.reason) == (
                HANDLER,
                "CrmUnavailable",
                "transient",
            )
            assert group.count >= 5
            assert "luca" not in group.message.lower()
            # The breaker holds every handler of its circuit: the CRM's three.
            holds = {h.handler: h for h in health.holds()}
            assert set(holds) == set(breaker.handlers)
            assert {(h.by, h.circuit) for h in holds.values()} == {("breaker", CIRCUIT)}
            assert holds[HANDLER].held >= EVENTS - 1

            crm.outage_status = None
            start = time.monotonic()
            await await_for(
                lambda: len(crm.contacts) == EVENTS, timeout_s=120, what="every contact"
            )
            took_s = time.monotonic() - start
            await await_for(lambda: r.quiet(ids), what="every pair final")
            notices = _notices(r)
            # The scheduler told the chat of each transition once.
            await await_for(lambda: len(chat.posts) >= 4, what="the notices in the chat")
            await asyncio.sleep(2)  # time for a duplicate to show, were there one
            told = Counter(str(p["text"]).split("*")[1] for p in chat.posts)
            assert told == Counter(
                {"group_opened": 1, "breaker_opened": 1, "breaker_closed": 1, "group_closed": 1}
            )
            assert health.holds() == []
            assert health.breakers() == []
            assert health.groups() == []

        # Each held event reached the CRM exactly once, and never faster than its pace.
        ok = sorted(c.at for c in crm.calls if c.status == 200)
        per_customer = Counter(c.uuid for c in crm.calls if c.status == 200)
        assert len(ok) == EVENTS
        assert set(per_customer.values()) == {1}
        assert set(per_customer) == set(customers.values())
        for i, at in enumerate(ok):
            in_a_second = sum(1 for other in ok[i:] if other - at < 1.0)
            # The release's pace and the CRM's token bucket (a second's burst) together.
            assert in_a_second <= 2 * RATE + 1, (i, in_a_second)
        assert took_s >= (EVENTS - 2 * RATE) / RATE * 0.9
        assert notices["breaker_opened"] == 1
        assert notices["breaker_closed"] == 1
        assert notices["group_opened"] == 1
        assert notices["group_closed"] == 1
    finally:
        chat.stop()
        crm.stop()
