"""``calhook exporter``: the worker side's metrics, read from Redis at each scrape."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import redis

from calhook.messages import Delivery, dispatch_message
from calhook.redis_server import RedisServer, free_port
from tests.conftest import ROOT
from tests.support.waiting import wait_for
from workers.stats import count_outcome


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


def test_queue_gauges_and_handler_outcomes_are_exported(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        client.lpush("dispatch", dispatch_message(Delivery("e1", "{}", "default", 1.0), "x"))
        count_outcome(client, "crm.sync", "ok", 0.03)
        count_outcome(client, "crm.sync", "ok", 0.2)
        count_outcome(client, "crm.sync", "retry_scheduled", 2.0)
        port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "calhook", "exporter", "--host", "127.0.0.1", "--port",
             str(port)],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": server.url},
        )  # fmt: skip
        try:
            text = wait_for(lambda: scrape(port), what="the exporter to answer")
        finally:
            exporter.send_signal(signal.SIGTERM)
            assert exporter.wait(timeout=30) == 0
        client.close()

    assert 'calhook_queue_ready{queue="dispatch"} 1.0' in text
    assert 'calhook_handler_outcomes_total{handler="crm.sync",outcome="ok"} 2.0' in text
    assert (
        'calhook_handler_outcomes_total{handler="crm.sync",outcome="retry_scheduled"} 1.0' in text
    )
    assert 'calhook_handler_duration_seconds_bucket{handler="crm.sync",le="0.05"} 1.0' in text
    assert 'calhook_handler_duration_seconds_bucket{handler="crm.sync",le="+Inf"} 3.0' in text
    assert 'calhook_handler_duration_seconds_count{handler="crm.sync"} 3.0' in text
    assert "calhook_delayed_total 0.0" in text
