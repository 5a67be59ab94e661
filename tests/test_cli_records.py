"""Dead letters and parked events chosen by query: a dry run says how many and which groups,
a bulk replay runs at a chosen rate, stops on Ctrl-C and goes on when run again, each record
replayed once (real Redis, the real ``calhook`` command)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import redis

from calhook.store.keys import DEAD
from calhook.store.pairs import PairStore
from tests.conftest import ROOT
from tests.ingest.stored import ids_of
from tests.support import store
from tests.support.waiting import wait_for


def cli(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "calhook", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": url, "CALHOOK_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a suite started in the background of a shell ignores SIGINT, and
        # its children would inherit that (Python then never raises KeyboardInterrupt).
        preexec_fn=_sigint_default,
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def lay_out(pairs: PairStore, n: int, handler: str, error: str) -> list[str]:
    events = []
    for _ in range(n):
        event_id = store.accept(pairs)
        store.dead_letter(pairs, event_id, handler, "crm", error=error)
        events.append(event_id)
    return events


def test_a_dry_run_says_how_many_in_which_groups_and_changes_nothing(
    quiet_url: str, quiet_db: redis.Redis, quiet_pairs: PairStore
) -> None:
    lay_out(quiet_pairs, 3, "crm.sync", "CrmDown: 503 from the CRM")
    lay_out(quiet_pairs, 2, "crm.sync", "CrmRefused: 422 invalid email")
    lay_out(quiet_pairs, 1, "notify.email", "SMTPServerDisconnected: gone")

    out, err = cli(quiet_url, "dlq", "replay", "--handler", "crm.sync", "--dry-run").communicate(
        timeout=60
    )

    assert out.splitlines() == [
        "would replay 5",
        "        3  crm.sync  permanent  CrmDown",
        "        2  crm.sync  permanent  CrmRefused",
    ], err
    assert quiet_db.zcard(DEAD) == 6
    by_error = cli(quiet_url, "dlq", "list", "--error", "crmdown", "--json").communicate(
        timeout=60
    )[0]
    assert json.loads(by_error)["count"] == 6
    assert len(json.loads(by_error)["records"]) == 3


def test_a_bulk_replay_stopped_halfway_and_run_again_replays_each_once(
    quiet_url: str, quiet_db: redis.Redis, quiet_pairs: PairStore
) -> None:
    # Given 1,000 dead letters of a CRM outage, and 20 of another cause
    events = lay_out(quiet_pairs, 1000, "crm.sync", "CrmDown: 503 from the CRM")
    others = lay_out(quiet_pairs, 20, "crm.sync", "KeyError: 'email'")
    quiet_db.delete("crm")  # the messages of the handlers' first runs (no worker reads here)

    # When a replay of the outage's letters at 200 a second is stopped with Ctrl-C (slow enough
    # that a loaded machine still stops it well before the end)
    first = cli(quiet_url, "dlq", "replay", "--error", "CrmDown", "--since", "1h", "--rate", "200")
    wait_for(lambda: 100 <= 1000 - _left(quiet_db, events) <= 500, timeout_s=30,
             what="the replay under way")  # fmt: skip
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    done_first = int(out.splitlines()[-2].split()[0])
    assert out.splitlines()[-1].startswith(f"stopped with {1000 - done_first} left"), out

    # And the same command is run again
    second = cli(quiet_url, "dlq", "replay", "--error", "CrmDown", "--since", "1h")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err

    # Then every letter of the outage was replayed once, by one run or the other, and no other
    assert out.splitlines()[-1] == f"{1000 - done_first} replayed"
    assert _left(quiet_db, events) == 0
    assert _left(quiet_db, others) == 20
    queued = ids_of(quiet_db.lrange("crm", 0, -1))
    assert sorted(queued) == sorted(events)
    for event_id in events[:50]:
        assert quiet_pairs.states(event_id)["crm.sync"].state == "queued"


def _left(db: redis.Redis, events: list[str]) -> int:
    with db.pipeline(transaction=False) as pipe:
        for event_id in events:
            pipe.exists(f"calhook:dead:{event_id}.crm.sync")
        return sum(pipe.execute())


def test_a_purge_by_time_window_spares_the_rest(
    quiet_url: str, quiet_db: redis.Redis, quiet_pairs: PairStore
) -> None:
    old = lay_out(quiet_pairs, 3, "crm.sync", "CrmDown: 503")
    for event_id in old:  # stored two days ago
        quiet_db.hset(
            f"calhook:dead:{event_id}.crm.sync", "failed_at", f"{time.time() - 2 * 86_400}"
        )
    recent = lay_out(quiet_pairs, 2, "crm.sync", "CrmDown: 503")

    dry = cli(quiet_url, "dlq", "purge", "--until", "1d", "--dry-run").communicate(timeout=60)[0]
    assert dry.splitlines()[0] == "would purge 3"
    out, err = cli(quiet_url, "dlq", "purge", "--until", "1d").communicate(timeout=60)

    assert out.splitlines()[-1] == "3 purged", err
    assert _left(quiet_db, old) == 0
    assert _left(quiet_db, recent) == 2
