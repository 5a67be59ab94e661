"""Ingress benchmark: calhook's ingress beside the bare aiohttp bound and the send_task recipe.

Each server is one process pinned to its own core; wrk (saturation) or bench.loadgen (fixed
offered rates) and Redis share the other core. Rounds interleave the servers, so the three see
the same machine at nearly the same time, and the ratios are taken within one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.fixtures import fixture_bodies, large_body
from bench.loadgen import write_bodies
from bench.procs import BIN, CALHOOK, CORES, LOAD_CORE, SERVER_CORE, Child, wait_for_port
from calhook.redis_server import RedisServer, free_port

SECRET = "bench-secret-0123456789abcdef"  # noqa: S105 (a local benchmark's)
SERVERS = ("bare", "recipe", "calhook")
PATH = "/webhooks/calenso"


@dataclass
class Config:
    rounds: int
    seconds: float
    rates: tuple[int, ...]
    connections: int = 64


def _server_argv(kind: str, port: int) -> list[str]:
    if kind == "calhook":
        return [*CALHOOK, "serve", "--host", "127.0.0.1", "--port", str(port)]
    return [str(BIN / "python"), "-m", f"bench.{kind}", str(port)]


@contextmanager
def servers(redis_url: str, work: Path) -> Iterator[dict[str, tuple[int, Child]]]:
    env = {
        "REDIS_URL": redis_url,
        "CALHOOK_AUTH_SECRETS": SECRET,
        "CALHOOK_SPOOL_DIR": str(work / "spool"),
    }
    with ExitStack() as stack:
        running = {}
        for kind in SERVERS:
            port = free_port()
            child = stack.enter_context(
                Child(f"ingress-{kind}", _server_argv(kind, port), env, work, [SERVER_CORE])
            )
            wait_for_port(port, child.proc)
            running[kind] = (port, child)
        yield running


def wrk(port: int, bodies: Path, seconds: float, connections: int, run_id: str) -> dict[str, Any]:
    """Saturation: wrk with one thread on the load core; one JSON result line."""
    command = [
        "taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--latency", "-s", str(Path(__file__).with_name("wrk.lua")),
        f"http://127.0.0.1:{port}{PATH}", "--", str(bodies), SECRET, run_id,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    raw = json.loads(out.strip().splitlines()[-1])
    completed = raw["requests"] - raw["status_errors"]
    return {
        "rate": completed / (raw["duration_us"] / 1e6),
        "requests": raw["requests"],
        "errors": raw["status_errors"] + raw["connect_errors"] + raw["read_errors"]
        + raw["write_errors"] + raw["timeouts"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000,
    }  # fmt: skip


def offered(port: int, bodies: Path, rate: int, seconds: float, work: Path) -> dict[str, Any]:
    """A fixed offered rate from bench.loadgen, on the load core."""
    out = work / "loadgen.json"
    command = [
        "taskset", "-c", str(LOAD_CORE), str(BIN / "python"), "-m", "bench.loadgen",
        "--port", str(port), "--rate", str(rate), "--duration", str(seconds),
        "--bodies", str(bodies), "--secret", SECRET, "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
    result: dict[str, Any] = json.loads(out.read_text())
    result.pop("acks", None)
    bad = sum(n for status, n in result["statuses"].items() if not status.startswith("2"))
    result["errors"] = result["errors"] + bad
    return result


def run(config: Config, progress: Any) -> dict[str, Any]:
    """All ingress figures: {server: {point: [one dict per round]}}."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in SERVERS}
    with tempfile.TemporaryDirectory(prefix="calhook-bench-") as tmp:
        work = Path(tmp)
        small = write_bodies(fixture_bodies(), work / "bodies-small")
        large = write_bodies([large_body()], work / "bodies-large")
        with RedisServer(work / "redis") as server, servers(server.url, work) as running:
            _pin_redis(server)
            client = redis.Redis.from_url(server.url)
            points: list[tuple[str, Any]] = [("saturation", None), ("saturation_200kb", None)]
            points += [(f"rate_{r}", r) for r in config.rates]
            for kind, (port, _) in running.items():  # warm-up: imports, JIT-free but caches
                wrk(port, small, 1, config.connections, f"warm-{kind}")
                client.flushall()
            for round_ in range(config.rounds):
                for point, rate in points:
                    for kind, (port, _) in running.items():
                        run_id = f"{kind}-{point}-{round_}-{time.time_ns()}"
                        if point == "saturation":
                            figure = wrk(port, small, config.seconds, config.connections, run_id)
                        elif point == "saturation_200kb":
                            figure = wrk(port, large, config.seconds, 16, run_id)
                        else:
                            figure = offered(port, small, rate, config.seconds, work)
                        results[kind].setdefault(point, []).append(figure)
                        client.flushall()
                        progress(f"ingress {kind:8} {point:17} round {round_ + 1}: "
                                 f"{figure['rate']:8.0f}/s p99 {figure['p99_ms']:7.2f} ms "
                                 f"errors {figure['errors']}")  # fmt: skip
    return results


def _pin_redis(server: RedisServer) -> None:
    if server.pid is not None and len(CORES) > 1:
        os.sched_setaffinity(server.pid, {LOAD_CORE})
