"""``calhook events list`` with the selectors an outage needs: a handler, its pairs' state, and a
time range, on a quiet database laid out through the store's real transitions."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from calhook.store.health import Health
from calhook.store.pairs import PairStore
from tests.support.cli import ROOT, calhook
from tests.support.store import accept, route, start

H, Q = "crm.sync_customer", "crm"


def test_events_list_selects_by_handler_state_and_time(
    quiet_url: str, quiet_pairs: PairStore
) -> None:
    now = time.time()
    ids = []
    for ago_h in (5, 3, 1):
        event_id = accept(quiet_pairs, f'{{"h": {ago_h}}}'.encode(), received_at=now - ago_h * 3600)
        route(quiet_pairs, event_id, [(H, Q)])
        ids.append(event_id)
    other = accept(quiet_pairs, b'{"other": 1}')
    route(quiet_pairs, other, [("notify.staff", "notify")])
    Health(quiet_pairs.scripts).pause(H)
    assert start(quiet_pairs, H, ids[:2], Q) == ["held", "held"]

    listed = calhook(quiet_url, "events", "list", "--since", "1d", "--handler", H)
    assert [line.split()[0] for line in listed.splitlines()] == list(reversed(ids))
    assert [line.split()[-1] for line in listed.splitlines()] == [
        f"{H}=queued",
        f"{H}=held",
        f"{H}=held",
    ]
    held = json.loads(
        calhook(
            quiet_url,
            "events",
            "list",
            "--since",
            "1d",
            "--handler",
            H,
            "--state",
            "held",
            "--json",
        )
    )
    assert [e["event_id"] for e in held] == [ids[1], ids[0]]
    assert {e["state"] for e in held} == {"held"}
    window = calhook(quiet_url, "events", "list", "--since", "4h", "--until", "2h", "--json")
    assert [e["event_id"] for e in json.loads(window)] == [ids[1]]


def test_a_state_without_a_handler_is_refused(quiet_url: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "calhook", "events", "list", "--state", "held"],
        cwd=ROOT,
        env={"REDIS_URL": quiet_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "--state needs --handler" in run.stderr
