"""``calhook handlers``: the routes as the running workers published them, and the mistakes a
new team makes caught by name (real worker processes, on a database of their own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.cli import ROOT
from tests.support.waiting import wait_for
from tests.support.worker import TEST_HANDLER_MODULES, CalhookProcess, WorkerProcess
from workers import routes

TEAM = "tests.support.team_handlers"


def calhook(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calhook", *args],
        cwd=ROOT, env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def worker(url: str, log: Path, queues: str, modules: str, **env: str) -> WorkerProcess:
    process = WorkerProcess(url, log, 1, CALHOOK_HANDLER_MODULES=modules, **env)
    process.args = ["worker", "-Q", queues, "-c", "1"]
    return process


@pytest.fixture
def fleet(quiet_url: str, quiet_db: redis.Redis, tmp_path: Path) -> Iterator[list[CalhookProcess]]:
    started: list[CalhookProcess] = []
    yield started
    for process in started:
        process.stop()


def published(db: redis.Redis, n: int) -> bool:
    return len(routes.read(db)) == n


def test_a_module_listed_only_on_its_queues_worker_is_caught(
    quiet_url: str, quiet_db: redis.Redis, tmp_path: Path, fleet: list[CalhookProcess]
) -> None:
    # Given the dispatching worker without the team's module, and the team's worker with it
    dispatching = worker(quiet_url, tmp_path / "a.log", "dispatch,audit,record",
                         TEST_HANDLER_MODULES)  # fmt: skip
    team = worker(quiet_url, tmp_path / "b.log", "team", TEAM)
    fleet += [dispatching.start(), team.start()]
    wait_for(lambda: published(quiet_db, 2), what="both workers' routes")

    # When ops look at the routes
    shown = calhook(quiet_url, "handlers")

    # Then the team's handler is shown run by its worker, and the mistake is named
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert ["customer.created", "team.welcome", "team", routes_name(team)] in rows
    assert "1 problem:" in shown.stdout
    assert (
        f"- team.welcome runs on {routes_name(team)} (queue team), but the dispatching workers "
        f"({routes_name(dispatching)}) do not know it: no event is routed to it"
    ) in shown.stdout
    assert "Install its package, or list its module, where the dispatch runs too." in shown.stdout
    assert calhook(quiet_url, "handlers", "routes", "--check").returncode == 1


def test_a_queue_nobody_consumes_is_caught_and_a_right_fleet_is_clean(
    quiet_url: str, quiet_db: redis.Redis, tmp_path: Path, fleet: list[CalhookProcess]
) -> None:
    # Given the module listed (or installed) everywhere, but no worker on its queue
    modules = f"{TEST_HANDLER_MODULES},{TEAM}"
    dispatching = worker(quiet_url, tmp_path / "a.log", "dispatch,audit,record", modules)
    fleet.append(dispatching.start())
    wait_for(lambda: published(quiet_db, 1), what="the worker's routes")

    checked = json.loads(calhook(quiet_url, "handlers", "routes", "--json").stdout)
    assert checked["problems"] == [
        "queue team (handler team.welcome) is consumed by no worker: its events wait. Run "
        "`calhook worker -Q team`."
    ]

    # When a worker on the queue starts, the fleet is right
    fleet.append(worker(quiet_url, tmp_path / "b.log", "team", modules).start())
    wait_for(lambda: published(quiet_db, 2), what="both workers' routes")
    shown = calhook(quiet_url, "handlers", "routes", "--check")
    assert shown.returncode == 0, shown.stdout
    assert "no problem" in shown.stdout

    # And a worker that stops withdraws its routes
    fleet.pop().stop()
    wait_for(lambda: published(quiet_db, 1), what="the stopped worker's routes gone")


def routes_name(process: WorkerProcess) -> str:
    """The name a worker publishes under: its host and main process."""
    assert process.process is not None
    entries = [line for line in process.lines() if line.get("msg") == "routes published"]
    if entries:
        return str(entries[-1]["worker"])
    import socket

    return f"{socket.gethostname()}:{process.process.pid}"


def test_a_handler_configured_only_on_its_queues_worker_is_caught(
    quiet_url: str, quiet_db: redis.Redis, tmp_path: Path, fleet: list[CalhookProcess]
) -> None:
    # Given the module everywhere, but its handler's configuration only on its own worker
    modules = f"{TEST_HANDLER_MODULES},{TEAM}"
    dispatching = worker(quiet_url, tmp_path / "a.log", "dispatch,audit,record", modules)
    team = worker(quiet_url, tmp_path / "b.log", "team", modules,
                  TEAM_MIRROR_URL="http://mirror.example")  # fmt: skip
    fleet += [dispatching.start(), team.start()]
    wait_for(lambda: published(quiet_db, 2), what="both workers' routes")

    shown = calhook(quiet_url, "handlers")

    # Then the dispatch is named as loading it unconfigured, with what to do
    assert (
        f"- team.mirror runs on {routes_name(team)} (queue team), but the dispatching workers "
        f"({routes_name(dispatching)}) load it unconfigured, so no event is routed to it"
    ) in shown.stdout
    assert "its enabled= must answer the same on every worker" in shown.stdout
    assert (
        f"{routes_name(dispatching)}: queues audit, dispatch, record; not run here: "
        "team.mirror (not configured)" in shown.stdout
    )


def entry(
    worker: str, queues: list[str], handlers: dict[str, str], **inactive: str
) -> dict[str, Any]:
    """A worker's published entry: handler name -> queue; inactive name -> why."""
    published = [
        {"name": n, "types": ["lead.created"], "queue": q, "package": ""}
        for n, q in handlers.items()
    ]
    return {
        "worker": worker,
        "queues": queues,
        "handlers": published,
        "inactive": {n.replace("_", "."): why for n, why in inactive.items()},
    }


def test_a_queue_worker_that_does_not_run_what_is_routed_to_it_is_named() -> None:
    # The dispatch runs notify.chat (configured there); the notify queue's worker does not.
    workers = [
        entry("d", ["dispatch", "audit"], {"notify.chat": "notify", "audit": "audit"}),
        entry("n", ["notify"], {"audit": "audit"}, notify_chat="not configured"),
    ]
    assert routes.problems(workers) == [
        "notify.chat is routed to queue notify, but n consume it without running it (n: not "
        "configured): what they take is dead-lettered as unknown_handler. Configure and install "
        "it the same on every worker of the queue."
    ]


def test_dispatching_workers_that_disagree_are_named() -> None:
    workers = [
        entry("d1", ["dispatch"], {"bookings.table": "bookings"}),
        entry("d2", ["dispatch"], {}, bookings_table="not configured"),
        entry("q", ["bookings"], {"bookings.table": "bookings"}),
    ]
    assert routes.problems(workers) == [
        "bookings.table is routed by some dispatching workers but not by d2 (d2: not "
        "configured): the events those dispatch never reach it."
    ]
