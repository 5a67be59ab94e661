"""``calhook exporter``: the worker side's metrics, read from Redis at each scrape."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis

from calhook.redis_server import RedisServer, free_port
from calhook.settings import Settings
from calhook.store.connect import pair_store
from calhook.store.pairs import Ending
from calhook.store.stats import count_outcome
from tests.conftest import ROOT
from tests.support.store import accept, end, route, start
from tests.support.waiting import wait_for


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


def test_queue_gauges_and_handler_outcomes_are_exported(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        # Given one event waiting for dispatch, one crm pair waiting for its retry and one
        # running, on a Redis no worker consumes
        client = redis.Redis.from_url(server.url)
        pairs = pair_store(client, make_settings())
        accept(pairs)
        retried, running = accept(pairs), accept(pairs)
        for event_id in (retried, running):
            route(pairs, event_id, [("crm.sync", "crm")])
        # (the retry's outcome and duration counted by its transition, two more directly)
        retry = Ending(retried, "retry", "retry_scheduled", delay_s=60, duration_s=2.0)
        assert end(pairs, "crm.sync", "crm", retry) == "ok"
        assert start(pairs, "crm.sync", [running], "crm") == ["run"]
        count_outcome(client, "crm.sync", "ok", 0.03)
        count_outcome(client, "crm.sync", "ok", 0.2)
        port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "calhook", "exporter", "--host", "127.0.0.1", "--port",
             str(port)],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": server.url},
        )  # fmt: skip
        try:
            # When Prometheus scrapes the exporter
            text = wait_for(lambda: scrape(port), what="the exporter to answer")
        finally:
            exporter.send_signal(signal.SIGTERM)
            assert exporter.wait(timeout=30) == 0
        client.close()

    # Then the scrape shows each, in pairs
    assert 'calhook_queue_ready{queue="dispatch"} 1.0' in text
    assert 'calhook_queue_ready{queue="crm"} 0.0' in text
    assert 'calhook_queue_delayed{queue="crm"} 1.0' in text
    assert 'calhook_queue_running{queue="crm"} 1.0' in text
    assert 'calhook_handler_outcomes_total{handler="crm.sync",outcome="ok"} 2.0' in text
    assert (
        'calhook_handler_outcomes_total{handler="crm.sync",outcome="retry_scheduled"} 1.0' in text
    )
    assert 'calhook_handler_duration_seconds_bucket{handler="crm.sync",le="0.05"} 1.0' in text
    assert 'calhook_handler_duration_seconds_bucket{handler="crm.sync",le="+Inf"} 3.0' in text
    assert 'calhook_handler_duration_seconds_count{handler="crm.sync"} 3.0' in text
    # The open pairs the scheduler watches: the dispatch, the retry and the running pair.
    assert "calhook_pairs_watched 3.0" in text
