"""The ``calhook`` command, run as people run it: a real process against real servers."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from calhook.constants import trail_key
from calhook.messages import read_task_message
from calhook.redis_server import free_port
from tests.conftest import FIXTURES, ROOT, SECRET
from tests.support.waiting import wait_for

SAMPLE = FIXTURES / "customer.created.nested.json"


def calhook(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calhook", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_schema_prints_the_json_schema() -> None:
    result = calhook("schema")

    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"CustomerEvent", "AppointmentEvent", "Envelope"} <= set(schema["$defs"])


def test_a_bad_setting_is_named() -> None:
    result = calhook("send", str(SAMPLE), env={"CALHOOK_PORT": "eighty"})

    assert result.returncode != 0
    assert "CALHOOK_PORT" in result.stderr


def test_serve_refuses_to_start_without_a_secret(redis_url: str) -> None:
    result = calhook("serve", env={"REDIS_URL": redis_url, "CALHOOK_AUTH_SECRETS": ""})

    assert result.returncode != 0
    assert "no secret configured" in result.stderr


def readyz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@pytest.fixture
def ingress_port(redis_url: str, redis_db: redis.Redis, tmp_path: Path) -> Iterator[int]:
    """A real `calhook serve` process on a free port."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "CALHOOK_AUTH_SECRETS": SECRET,
           "CALHOOK_SPOOL_DIR": str(tmp_path / "spool")}  # fmt: skip
    with (tmp_path / "ingress.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "calhook", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stderr=log,
        )
    wait_for(lambda: process.poll() is not None or readyz(port), what="the ingress")
    assert process.poll() is None, (tmp_path / "ingress.log").read_text()
    yield port
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_send_posts_a_file_as_calenso_would(ingress_port: int, redis_db: redis.Redis) -> None:
    env = {"CALHOOK_PORT": str(ingress_port), "CALHOOK_AUTH_SECRETS": SECRET}

    first = calhook("send", str(SAMPLE), env=env)
    again = calhook("send", str(SAMPLE), env=env)
    refused = calhook("send", "--secret", "wrong", str(SAMPLE), env=env)

    assert first.returncode == 0, first.stderr
    assert ": 202 " in first.stdout
    event_id = json.loads(first.stdout.split(": 202 ", 1)[1])["event_id"]
    assert json.loads(again.stdout.split(": 200 ", 1)[1]) == {
        "status": "duplicate",
        "event_id": event_id,
    }
    assert refused.returncode == 1
    assert ": 401 " in refused.stdout
    # One event queued: still waiting, or already taken by the session's worker if another
    # test module started it (then it is dispatched: its trail begins).
    raw: list[bytes] = redis_db.lrange("dispatch", 0, -1)  # type: ignore[assignment]
    queued = [i for m in raw for i in read_task_message(m)[2]["ids"]]
    if queued != [event_id]:
        assert not queued
        wait_for(lambda: bool(redis_db.exists(trail_key(event_id))), what="the event dispatched")


@pytest.mark.parametrize("flags", [(), ("--sentinel",)], ids=["one-redis", "sentinel"])
def test_dev_runs_the_whole_pipeline_with_an_embedded_redis(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    # What `make run` does: no REDIS_URL, so Redis is embedded; ingress and worker as children.
    # With --sentinel: a master, a replica and three sentinels, every process following them.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(CALHOOK_AUTH_SECRETS=SECRET, CALHOOK_DATA_DIR=str(tmp_path / "data"))
    log_path = tmp_path / "dev.log"
    with log_path.open("w") as log:
        dev = subprocess.Popen(
            [sys.executable, "-m", "calhook", "dev", "--port", str(port), *flags],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: readyz(port), timeout_s=60, what="`calhook dev` to be ready")
        # The banner's command, run as in another terminal: neither the secret nor the port set.
        [try_line] = [ln for ln in log_path.read_text().splitlines() if "Try:" in ln]
        command = shlex.split(try_line.split("Try:", 1)[1])
        assert command[:2] == ["calhook", "send"]
        unset = ("CALHOOK_AUTH_SECRETS", "CALHOOK_PORT")
        terminal = {k: v for k, v in env.items() if k not in unset}
        sent = subprocess.run(
            [sys.executable, "-m", "calhook", *command[1:-1], str(SAMPLE)],
            cwd=ROOT, env=terminal, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ": 202 " in sent.stdout, (try_line, sent.stdout, sent.stderr)
        event_id = json.loads(sent.stdout.split(": 202 ", 1)[1])["event_id"]

        def handled() -> bool:
            lines = [ln for ln in log_path.read_text().splitlines() if event_id in ln]
            return any("dispatched" in ln for ln in lines) and any(
                "handler done" in ln and "handler=audit" in ln for ln in lines
            )

        wait_for(handled, timeout_s=60, what="the event dispatched and handled")
        output = log_path.read_text()
        assert f"Post to: http://127.0.0.1:{port}/webhooks/calenso" in output
        assert "Stop:    Ctrl-C" in output
        if flags:
            assert "Redis:   redis+sentinel://127.0.0.1:" in output
            assert "acknowledgements replicated" in output
            assert (tmp_path / "data" / "sentinel" / "sentinel-2" / "sentinel.conf").is_file()
        else:
            assert (tmp_path / "data" / "redis").is_dir()
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert dev.wait(timeout=60) == 0
    assert not readyz(port)


@pytest.mark.parametrize(
    "args",
    [("dlq", "list", "--limit", "0"), ("parked", "list", "--limit", "-3"),
     ("events", "list", "--limit", "0")],
)  # fmt: skip
def test_a_bad_argument_exits_non_zero_with_its_reason(args: tuple[str, ...]) -> None:
    done = calhook(*args, env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 2
    assert "Invalid value for '--limit'" in done.stderr
    assert "Traceback" not in done.stderr
