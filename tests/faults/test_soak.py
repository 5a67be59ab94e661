"""The soak: thousands of events through random handler failures, two worker kills and a Redis
restart. At the end an audit over every accepted event: each handler completed exactly once, or
the pair is in the dead-letter store; none missing, none doubled."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.faults.rig import Rig, rig
from tests.support.recording import FLAKY_TYPE
from tests.support.waiting import await_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EVENTS = int(os.environ.get("CALHOOK_SOAK_EVENTS", "2000"))
SCHEDULE_ATTEMPTS = 4  # the tests' CALHOOK_RETRY_SCHEDULE_S has three delays


def plan(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    for n in range(EVENTS):
        if rng.random() < 0.25:
            # 9 failures outlast the schedule: that event must end in the dead-letter store.
            events.append((FLAKY_TYPE, {"fail_times": rng.choice([0, 1, 2, 9]), "k": n}))
        else:
            events.append(("lead.created", {"lead": {"uuid": f"50a40000-0000-4000-8000-{n:012d}"}}))
    return events


def handlers_of(event_type: str) -> list[str]:
    return ["flaky"] if event_type == FLAKY_TYPE else ["audit", "record"]


async def post_wave(r: Rig, events: list[tuple[str, dict[str, Any]]], first: int) -> list[str]:
    ids = []
    for start in range(0, len(events), 100):
        chunk = events[start : start + 100]
        ids += [
            await r.post(event_type, data, first + start + i)
            for i, (event_type, data) in enumerate(chunk)
        ]
    return ids


def audit(r: Rig, accepted: dict[str, tuple[str, dict[str, Any]]]) -> Counter[str]:
    """Classify every (event, handler) pair of every accepted event."""
    counts: Counter[str] = Counter(accepted=len(accepted))
    effects, runs = r.effects(), r.runs()
    client = r.redis
    for event_id, (event_type, data) in accepted.items():
        raw: dict[bytes, bytes] = client.hgetall(f"calhook:ledger:{event_id}")  # type: ignore[assignment]
        ledger = {k.decode(): v.decode() for k, v in raw.items()}
        for handler in handlers_of(event_type):
            counts["pairs"] += 1
            outcome = ledger.get(handler)
            completions = int(ledger.get(f"{handler}#done", 0))
            effect = effects[f"{event_id}:{handler}"]
            dead = client.exists(f"calhook:dead:{event_id}.{handler}")
            should_die = data.get("fail_times", 0) >= SCHEDULE_ATTEMPTS
            if outcome is None:
                counts["missing"] += 1
            elif completions > 1 or effect > 1:
                counts["doubled"] += 1
            elif outcome == "done" and completions == 1 and not should_die:
                counts["handled_once"] += 1
            elif outcome == "dead" and dead and should_die and effect == 0:
                counts["dead_lettered"] += 1
            else:
                counts["wrong"] += 1
            if handler != "audit":
                expected = min(data.get("fail_times", 0) + 1, SCHEDULE_ATTEMPTS)
                counts["extra_runs_after_kills"] += max(runs[f"{event_id}:{handler}"] - expected, 0)
    return counts


async def test_soak_every_event_handled_exactly_once_or_dead_lettered(tmp_path: Path) -> None:
    rng = random.Random(20261126)
    events = plan(rng)
    quarter = len(events) // 4
    async with rig(tmp_path) as r:
        r.start_worker()
        r.start_scheduler()
        ids: list[str] = []

        ids += await post_wave(r, events[:quarter], 0)
        r.kill_workers()
        r.start_worker()

        ids += await post_wave(r, events[quarter : 2 * quarter], quarter)
        r.server.stop()  # the ingress spools; workers and scheduler lose their broker
        ids += await post_wave(r, events[2 * quarter : 3 * quarter], 2 * quarter)
        r.server.start()

        ids += await post_wave(r, events[3 * quarter :], 3 * quarter)
        r.kill_workers()
        r.start_worker()

        accepted = dict(zip(ids, events, strict=True))

        def finished() -> bool:
            client = r.redis
            with client.pipeline(transaction=False) as pipe:
                for event_id, (event_type, _) in accepted.items():
                    pipe.hmget(f"calhook:ledger:{event_id}", handlers_of(event_type))
                return all(None not in outcome for outcome in pipe.execute())

        await await_for(finished, timeout_s=600, what="every event to finish")
        counts = audit(r, accepted)
        assert r.scheduler is not None
        counts["resent_by_watchdog"] = sum(
            len(line["ids"])
            for line in r.scheduler.lines()
            if line.get("msg") == "watchdog queued lost messages again"
        )

    report = "\n".join(f"  {key:<24} {value}" for key, value in sorted(counts.items()))
    (tmp_path / "soak-audit.txt").write_text(report + "\n")
    print(f"\nsoak audit ({EVENTS} events):\n{report}")
    assert counts["accepted"] == EVENTS
    assert counts["missing"] == counts["doubled"] == counts["wrong"] == 0
    assert counts["handled_once"] + counts["dead_lettered"] == counts["pairs"]
    assert counts["dead_lettered"] > 0
