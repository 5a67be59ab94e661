"""``calhook handlers`` and ``calhook failures``: pausing and resuming a handler, the breakers,
and the failure groups, through the real command on a real Redis (states laid out by the
store's own transitions, ``tests/support/store.py``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from calhook.privacy import scrub
from calhook.store.health import Health
from calhook.store.pairs import Ending, PairStore
from calhook.store.stats import count_outcome
from tests.conftest import ROOT
from tests.support.store import accept, end, route, start

H, Q = "crm.sync_customer", "crm"
BREAKER = {"c": "hubspot", "h": [H], "n": 3, "w": 60_000, "p": 30_000, "m": 120_000}
DOWN = "CrmUnavailable: HubSpot answered 503 for anna.muster@example.org"
REJECTED = "CrmRejected: HubSpot answered 400: 'Anna Muster' is not a valid name"


def calhook(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``calhook ARGS…`` on ``url``, as an operator runs it; it may fail."""
    return subprocess.run(
        [sys.executable, "-m", "calhook", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": url, "CALHOOK_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(url: str, *args: str) -> str:
    done = calhook(url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def routed(pairs: PairStore, n: int, handler: str = H) -> list[str]:
    """``n`` events routed to ``handler``, received an hour ago and after, one a second."""
    ids = []
    for i in range(n):
        event_id = accept(pairs, f'{{"n": {i}}}'.encode(), received_at=time.time() - 3600 + i)
        route(pairs, event_id, [(handler, Q)])
        ids.append(event_id)
    return ids


def fail(pairs: PairStore, event_id: str, *, breaker: dict[str, Any] | None = None) -> None:
    """One transient failure of ``H`` for the event, as a worker ends it."""
    ending = Ending(
        event_id,
        "retry",
        "retry_scheduled",
        delay_s=3600.0,
        error=DOWN,
        gist=scrub(DOWN),
        breaker=breaker,
    )
    assert end(pairs, H, Q, ending) == "ok"


def reject(pairs: PairStore, event_id: str) -> None:
    """A permanent failure of ``H``: a dead letter."""
    ending = Ending(
        event_id, "dead", "dead_permanent", reason="permanent", error=REJECTED, gist=scrub(REJECTED)
    )
    assert end(pairs, H, Q, ending) == "ok"


def table(out: str) -> dict[str, dict[str, str]]:
    """The rows of a table printed by the command, by their first cell (cells are two spaces
    apart at least; a cell's text has single spaces)."""
    lines = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.strip()]
    head, rows = lines[0], lines[1:]
    return {row[0]: dict(zip(head, row, strict=True)) for row in rows}


# --- handlers ---------------------------------------------------------------------------------


def test_a_paused_handler_is_listed_until_resumed_and_released(
    quiet_url: str, quiet_db: redis.Redis, quiet_pairs: PairStore
) -> None:
    # Given a handler the workers know, with three events on their way
    count_outcome(quiet_db, H, "ok", 0.1)
    ids = routed(quiet_pairs, 3)

    # When an operator pauses it, and the workers take its events
    pause = ("handlers", "pause", H, "--reason", "HubSpot maintenance", "--by", "ops")
    paused = calhook(quiet_url, *pause)
    assert start(quiet_pairs, H, ids, Q) == ["held"] * 3

    # Then it is held, and listed with who, why, how many and since when
    assert paused.returncode == 0, paused.stderr
    assert paused.stderr == ""
    assert paused.stdout.startswith(f"paused {H} (by ops: HubSpot maintenance)")
    out = ok(quiet_url, "handlers", "list")
    assert out.splitlines()[0].split() == ["handler", "by", "reason", "since", "held", "oldest"]
    assert f"{H}  ops" in out
    assert "HubSpot maintenance" in out
    row = out.splitlines()[1].split()
    assert (row[0], row[-2], row[-1]) == (H, "3", "60m")
    assert out.splitlines()[-1] == "no breaker is open"
    (hold,) = json.loads(ok(quiet_url, "handlers", "list", "--json"))["holds"]
    assert {k: hold[k] for k in ("handler", "by", "reason", "held", "releasing")} == {
        "handler": H,
        "by": "ops",
        "reason": "HubSpot maintenance",
        "held": 3,
        "releasing": False,
    }
    assert time.time() - 10 < hold["since"] <= time.time()

    # When it is resumed at a pace
    resumed = ok(quiet_url, "handlers", "resume", H, "--rate", "5/s", "--by", "ops")

    # Then the command says how many and how fast, and the list shows it releasing
    assert resumed == (
        f"resumed {H}: 3 held events will be released, oldest first, at 5/s (about 1s) "
        "by the scheduler\n"
    )
    assert "(resumed; releasing)" in ok(quiet_url, "handlers", "list")
    # And once the scheduler's release queued them, nothing is held any more
    Health(quiet_pairs.scripts).release(rate_per_s=100, most=1000, batch_max=10)
    assert {quiet_pairs.states(e)[H].state for e in ids} == {"queued"}
    assert ok(quiet_url, "handlers", "list") == "no handler is held\nno breaker is open\n"
    assert json.loads(ok(quiet_url, "handlers", "list", "--json")) == {
        "holds": [],
        "breakers": [],
    }


def test_a_handler_no_worker_ever_ran_is_paused_with_a_warning(
    quiet_url: str, quiet_pairs: PairStore
) -> None:
    done = calhook(quiet_url, "handlers", "pause", "crm.sync_custmer")
    assert done.returncode == 0, done.stderr
    assert "no worker ever recorded a handler named crm.sync_custmer" in done.stderr
    assert [h.handler for h in Health(quiet_pairs.scripts).holds()] == ["crm.sync_custmer"]
    # Its own user name stands for the operator when --by is not given
    assert "by " in done.stdout


def test_a_handler_that_ran_is_paused_without_a_warning(
    quiet_url: str, quiet_pairs: PairStore
) -> None:
    (event_id,) = routed(quiet_pairs, 1)
    fail(quiet_pairs, event_id)  # its duration and outcome are recorded by the transition
    done = calhook(quiet_url, "handlers", "pause", H)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(
    "args",
    [
        ("handlers", "pause", "crm sync"),
        ("handlers", "pause", "crm/sync"),
        ("handlers", "pause", "x" * 101),
        ("handlers", "pause", "calhook:hold"),
        ("handlers", "resume", "*"),
        ("handlers", "resume", H, "--rate", "0"),
        ("handlers", "resume", H, "--rate", "fast"),
    ],
)
def test_a_bad_name_or_rate_exits_2_and_holds_nothing(
    quiet_url: str, quiet_pairs: PairStore, args: tuple[str, ...]
) -> None:
    done = calhook(quiet_url, *args)
    assert done.returncode == 2, done
    assert "Invalid value" in done.stderr
    assert Health(quiet_pairs.scripts).holds() == []


def test_resuming_a_handler_not_paused_exits_1_with_its_reason(quiet_url: str) -> None:
    done = calhook(quiet_url, "handlers", "resume", H)
    assert done.returncode == 1
    assert done.stderr == f"Error: {H} is not paused\n"


def test_a_handler_held_by_its_breaker_is_listed_with_the_breaker(
    quiet_url: str, quiet_pairs: PairStore
) -> None:
    # Given three transient failures in a row of the circuit "hubspot" (the third, once it opened
    # the breaker, is held), and an event after
    ids = routed(quiet_pairs, 4)
    for event_id in ids[:3]:
        fail(quiet_pairs, event_id, breaker=BREAKER)
    assert start(quiet_pairs, H, ids[3:], Q) == ["held"]

    # When ops list the held handlers
    out = ok(quiet_url, "handlers", "list")

    # Then the handler is held by the breaker of its circuit, open for about 30 s more
    holds, breakers = out.split("\n\n")
    row = table(holds)[H]
    assert (row["by"], row["held"]) == ("breaker:hubspot", "2"), out
    assert "3 failures in a row (CrmUnavailable)" in holds
    breaker = table(breakers)["hubspot"]
    assert (breaker["state"], breaker["failures"], breaker["error"]) == (
        "open",
        "3",
        "CrmUnavailable",
    )
    assert breaker["next probe"] in ("29s", "30s")
    listed = json.loads(ok(quiet_url, "handlers", "list", "--json"))
    assert [(b["circuit"], b["state"], b["handlers"]) for b in listed["breakers"]] == [
        ("hubspot", "open", [H])
    ]
    assert listed["holds"][0]["by"] == "breaker"

    # And resuming it closes the breaker
    assert "2 held events will be released" in ok(quiet_url, "handlers", "resume", H)
    assert ok(quiet_url, "handlers", "list").endswith("no breaker is open\n")


# --- failures ---------------------------------------------------------------------------------


def test_failure_groups_are_listed_shown_acknowledged_and_resolved(
    quiet_url: str, quiet_pairs: PairStore
) -> None:
    # Given three transient failures and a permanent one of the same handler
    ids = routed(quiet_pairs, 4)
    for event_id in ids[:3]:
        fail(quiet_pairs, event_id)
    reject(quiet_pairs, ids[3])

    # When ops list the failure groups
    listed = json.loads(ok(quiet_url, "failures", "--json"))

    # Then there is a group per error class and reason
    assert listed["count"] == 2
    rejected, down = sorted(listed["groups"], key=lambda g: str(g["error"]))
    assert (rejected["error"], rejected["reason"], rejected["count"]) == (
        "CrmRejected",
        "permanent",
        1,
    )
    assert (down["error"], down["reason"], down["count"], down["state"]) == (
        "CrmUnavailable",
        "transient",
        3,
        "open",
    )
    assert down["samples"] == ids[:3]
    assert down["message"] == "CrmUnavailable: HubSpot answered 503 for a***@e***.org"
    out = ok(quiet_url, "failures")
    assert out.splitlines()[0] == "2 failure groups open or acknowledged"
    rows = table("\n".join(out.splitlines()[1:]))
    assert (
        rows.keys() == table("\n".join(ok(quiet_url, "failures", "list").splitlines()[1:])).keys()
    )
    assert (rows[down["id"]]["handler"], rows[down["id"]]["count"]) == (H, "3")
    assert "anna.muster" not in out

    # And each shows everything, with how to replay the dead letters of a permanent one
    assert json.loads(ok(quiet_url, "failures", "show", rejected["id"], "--json")) == rejected
    shown = ok(quiet_url, "failures", "show", rejected["id"])
    assert f"samples  {ids[3]}" in shown
    replay = f"calhook dlq replay --handler {H} --reason permanent --error CrmRejected --dry-run"
    assert f"replay:  {replay}" in shown
    assert "replay:" not in ok(quiet_url, "failures", "show", down["id"])

    # When one is acknowledged and the other resolved
    acked = ok(quiet_url, "failures", "acknowledge", down["id"], "--by", "ops")
    resolved = ok(quiet_url, "failures", "resolve", rejected["id"], "--by", "ops")

    # Then the open list keeps the acknowledged one, --all has both
    assert acked.startswith(f"acknowledged {down['id']} ({H}: CrmUnavailable, transient")
    assert resolved.startswith(f"resolved {rejected['id']}")
    now = json.loads(ok(quiet_url, "failures", "--json"))
    assert [(g["id"], g["state"]) for g in now["groups"]] == [(down["id"], "acknowledged")]
    every = json.loads(ok(quiet_url, "failures", "list", "--all", "--json"))
    assert {g["id"]: (g["state"], g["by"]) for g in every["groups"]} == {
        down["id"]: ("acknowledged", ""),
        rejected["id"]: ("resolved", "ops"),
    }
    assert json.loads(ok(quiet_url, "failures", "--handler", "other", "--json"))["count"] == 0
    limited = json.loads(ok(quiet_url, "failures", "--all", "--limit", "1", "--json"))
    assert (limited["count"], len(limited["groups"])) == (2, 1)

    # And an ended group cannot be resolved again
    again = calhook(quiet_url, "failures", "resolve", rejected["id"])
    assert (again.returncode, again.stderr) == (
        1,
        f"Error: failure group {rejected['id']} is resolved already\n",
    )


def test_a_missing_group_exits_1_and_a_bad_id_2(quiet_url: str) -> None:
    for verb in ("show", "acknowledge", "resolve"):
        missing = calhook(quiet_url, "failures", verb, "0123456789ab")
        assert (missing.returncode, missing.stderr) == (
            1,
            "Error: no failure group 0123456789ab\n",
        )
        bad = calhook(quiet_url, "failures", verb, "open:crm.sync")
        assert bad.returncode == 2
    assert ok(quiet_url, "failures") == "0 failure groups open or acknowledged\n"


def test_resuming_one_handler_of_a_shared_circuit_says_the_others_run_again(
    quiet_url: str, quiet_pairs: PairStore
) -> None:
    # Given the circuit "hubspot" of two handlers, open after three failures of one
    shared = {**BREAKER, "h": [H, "crm.sync_lead"]}
    for event_id in routed(quiet_pairs, 3):
        fail(quiet_pairs, event_id, breaker=shared)

    # When ops resume the one
    out = ok(quiet_url, "handlers", "resume", H)

    # Then they are told the breaker is closed for the other as well
    assert "its breaker (circuit hubspot) is closed: crm.sync_lead run again too" in out
    listed = ok(quiet_url, "handlers", "list")
    assert "crm.sync_lead" not in listed
    assert listed.endswith("no breaker is open\n")
