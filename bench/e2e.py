"""End-to-end benchmark: from POST to every handler done, beside a bare Celery no-op task.

*Drain*: N events are accepted by the ingress while no worker runs; then one worker host starts
and the clock runs from its first completed handler to the N-th (the worker's start-up is not
counted). The bare baseline is the same with N ``send_task`` messages and a no-op task.
*Latency*: with the worker running, events are offered at a fixed rate; each event's latency is
from its 202 to its last handler's completion, read afterwards from its trail in Redis.
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

import orjson
import redis

from bench.fixtures import fixture_bodies
from bench.ingress import SECRET
from bench.loadgen import percentile, write_bodies
from bench.procs import BIN, ROOT, Child, wait_for_port
from calhook.constants import trail_key
from calhook.redis_server import RedisServer, free_port

DONE_KEY = "bench:done"


@dataclass(frozen=True)
class Scenario:
    """One worker host: its worker processes as (queues, pool, concurrency), and the load."""

    name: str
    handler: str  # "noop" or "io"
    workers: tuple[tuple[str, str, int], ...]
    events: int
    latency_rate: int
    latency_seconds: float
    bare_workers: tuple[tuple[str, str, int], ...] = ()

    def describe(self) -> str:
        return " + ".join(f"{q.replace(',', '+')}: {pool} x{c}" for q, pool, c in self.workers)


def _env(redis_url: str, work: Path, mode: str, slow_url: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "CALHOOK_AUTH_SECRETS": SECRET,
        "CALHOOK_SPOOL_DIR": str(work / "spool"),
        "CALHOOK_HANDLER_MODULES": "bench.handlers",
        "BENCH_HANDLER": mode,
        "BENCH_SLOW_URL": slow_url,
    }


def _post(port: int, bodies: Path, rate: float, seconds: float, work: Path) -> dict[str, Any]:
    out = work / "post.json"
    subprocess.run(
        [str(BIN / "python"), "-m", "bench.loadgen", "--port", str(port), "--rate", str(rate),
         "--duration", str(seconds), "--bodies", str(bodies), "--secret", SECRET, "--acks",
         "--connections", "32", "--out", str(out)],
        check=True, cwd=ROOT,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _wait_done(
    client: redis.Redis, n: int, timeout_s: float, queue: str | None = None
) -> tuple[float, float]:
    """Poll until ``n`` handlers are done: (start, time of the n-th completion).

    The start is when ``queue`` (preloaded with the events) first shrinks, i.e. when the
    worker took its first message; without a queue, the first completion.
    """
    deadline = time.monotonic() + timeout_s
    start = 0.0
    initial = client.llen(queue) if queue else 0
    while time.monotonic() < deadline:
        now = time.perf_counter()
        if not start and (client.llen(queue) < initial if queue else client.get(DONE_KEY)):
            start = now
        if int(client.get(DONE_KEY) or 0) >= n:
            return start or now, now
        time.sleep(0.002)
    raise RuntimeError(f"only {client.get(DONE_KEY)!r} of {n} handlers done in {timeout_s} s")


def _worker_argv(queues: str, pool: str, concurrency: int, bare: bool) -> list[str]:
    if bare:
        return [str(BIN / "celery"), "-A", "bench.bare_celery", "worker", "-Q", queues,
                "-P", pool, "-c", str(concurrency), "--without-mingle", "--without-gossip",
                "-l", "WARNING"]  # fmt: skip
    return [str(BIN / "calhook"), "worker", "-Q", queues, "-P", pool, "-c", str(concurrency),
            "--", "--without-gossip"]  # fmt: skip


@contextmanager
def _workers(
    specs: tuple[tuple[str, str, int], ...], env: dict[str, str], work: Path, bare: bool = False
) -> Iterator[list[Child]]:
    with ExitStack() as stack:
        children = []
        for n, (queues, pool, concurrency) in enumerate(specs):
            argv = _worker_argv(queues, pool, concurrency, bare)
            children.append(stack.enter_context(Child(f"e2e-worker-{n}", argv, env, work)))
        yield children


@contextmanager
def _ingress(env: dict[str, str], work: Path) -> Iterator[int]:
    """A `calhook serve` on a free port, until the block exits; yields the port."""
    port = free_port()
    argv = [str(BIN / "calhook"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with Child("e2e-ingress", argv, env, work) as ingress:
        wait_for_port(port, ingress.proc)
        yield port


def drain_calhook(scenario: Scenario, work: Path, slow_url: str) -> dict[str, Any]:
    bodies = write_bodies(fixture_bodies(), work / "bodies")
    with RedisServer(work / f"redis-{time.time_ns()}") as server:
        client = redis.Redis.from_url(server.url)
        env = _env(server.url, work, scenario.handler, slow_url)
        with _ingress(env, work) as port:
            posted = _post(port, bodies, 2000, scenario.events / 2000, work)
        accepted = posted["statuses"].get("202", 0)
        with _workers(scenario.workers, env, work):
            first, last = _wait_done(client, accepted, 600, queue="dispatch")
    return {"events": accepted, "rate": accepted / (last - first)}


def drain_bare(scenario: Scenario, work: Path, slow_url: str) -> dict[str, Any]:
    from celery import Celery

    payload = orjson.loads(fixture_bodies()[0].render("bare"))
    with RedisServer(work / f"redis-{time.time_ns()}") as server:
        client = redis.Redis.from_url(server.url)
        env = _env(server.url, work, scenario.handler, slow_url)
        sender = Celery("bare-sender", broker=server.url)
        for _ in range(scenario.events):
            sender.send_task("bare.noop", args=[payload], queue="bare")
        with _workers(scenario.bare_workers, env, work, bare=True):
            first, last = _wait_done(client, scenario.events, 600, queue="bare")
    return {"events": scenario.events, "rate": scenario.events / (last - first)}


def latency(scenario: Scenario, work: Path, slow_url: str) -> dict[str, Any]:
    """Fixed-rate load through the whole pipeline; latency from 202 to the last handler."""
    bodies = write_bodies(fixture_bodies(), work / "bodies")
    with RedisServer(work / f"redis-{time.time_ns()}") as server:
        client = redis.Redis.from_url(server.url)
        env = _env(server.url, work, scenario.handler, slow_url)
        with _ingress(env, work) as port, _workers(scenario.workers, env, work):
            time.sleep(3)  # the worker connects
            posted = _post(port, bodies, scenario.latency_rate, scenario.latency_seconds, work)
            acks: list[tuple[str, float]] = [tuple(a) for a in posted["acks"]]
            _wait_done(client, len(acks), 300)
        latencies = []
        with client.pipeline(transaction=False) as pipe:
            for event_id, _ in acks:
                pipe.lrange(trail_key(event_id), 0, -1)
            trails = pipe.execute()
    for (_, acked_at), trail in zip(acks, trails, strict=True):
        done = [e["at"] for e in map(orjson.loads, trail) if e.get("outcome") == "ok"]
        if done:
            latencies.append(max(done) - acked_at)
    latencies.sort()
    return {
        "offered_rate": scenario.latency_rate,
        "events": len(acks),
        "measured": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def run(scenarios: list[Scenario], rounds: int, progress: Any) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="calhook-e2e-") as tmp:
        work = Path(tmp)
        slow_port = free_port()
        slow_argv = [str(BIN / "python"), "-m", "bench.slow", str(slow_port)]
        with Child("slow-http", slow_argv, {}, work) as slow:
            wait_for_port(slow_port, slow.proc)
            slow_url = f"http://127.0.0.1:{slow_port}/"
            for round_ in range(rounds):
                for scenario in scenarios:
                    figures = results.setdefault(scenario.name, {})
                    # calhook and its baseline back to back, then the latency run.
                    steps = [("drain", drain_calhook)]
                    if scenario.bare_workers:
                        steps.append(("bare_drain", drain_bare))
                    steps.append(("latency", latency))
                    for step, fn in steps:
                        figure = fn(scenario, work, slow_url)
                        figures.setdefault(step, []).append(figure)
                        progress(f"e2e {scenario.name:12} {step:10} round {round_ + 1}: "
                                 + ", ".join(f"{k} {v:.1f}" for k, v in figure.items()
                                             if isinstance(v, float)))  # fmt: skip
    os.environ.pop("BENCH_HANDLER", None)
    return results
