"""End-to-end benchmark: from POST to every handler done, beside a bare Celery no-op task.

*Drain*: N events are accepted by the ingress while no worker runs (a backlog: the case where
batches form). Their queue is then renamed out of sight, the worker host starts, and once every
worker process is consuming (blocked on its queues) the backlog is renamed back; the clock runs
from that moment to the N-th completed handler, so the workers' start-up is not counted. The
bare baseline is the same with N ``send_task`` messages of a no-op task.
*Latency*: with the workers consuming and warmed up by a second of the same load, events are
offered at a fixed rate; each event's latency is from its 202 to its last handler's completion,
read afterwards from its trail in Redis (whose clock the scripts use: whole milliseconds).
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
from bench.procs import BIN, CALHOOK, CELERY, ROOT, Child, wait_for_port
from calhook.constants import DISPATCH_QUEUE, trail_key
from calhook.redis_server import RedisServer, free_port
from calhook.store.stats import outcomes

DONE_KEY = "bench:done"
# Where a backlog waits while the workers start (the benchmark's own key, not calhook's).
HELD = "bench:held:"
POLL_S = 0.005
STALL_S = 60.0
WARM_UP_S = 1.0
# The backlog is posted at this rate (the ingress takes twice that on this machine).
POST_RATE = 2000


@dataclass(frozen=True)
class Scenario:
    """One worker host: its worker processes as (queues, pool, concurrency), and the load."""

    name: str
    handler: str  # BENCH_HANDLER: "noop", "io" or "io_async" (bench/handlers.py)
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
        "CALHOOK_HANDLER_MODULES": "bench.handlers,-audit",
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


def _wait_done(client: redis.Redis, n: int, children: list[Child]) -> float:
    """Poll until ``n`` handlers are done; the time (perf_counter) the n-th was seen. Fails when
    no handler finished for ``STALL_S`` (a broken worker requeues forever)."""
    seen, progressed = -1, time.monotonic()
    while True:
        done = int(client.get(DONE_KEY) or 0)
        if done >= n:
            return time.perf_counter()
        if done != seen:
            seen, progressed = done, time.monotonic()
        elif time.monotonic() - progressed > STALL_S:
            logs = ", ".join(str(c.log_path) for c in children)
            raise RuntimeError(f"{done} of {n} handlers done, none for {STALL_S} s; see {logs}")
        time.sleep(POLL_S)


def wait_consuming(client: redis.Redis, children: list[Child], timeout_s: float = 60.0) -> None:
    """Wait until every worker process of the host is blocked on its queues (kombu's Redis
    transport consumes with BRPOP on one connection per worker), i.e. ready to take work."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.proc.poll() is not None:
                code = child.proc.returncode
                raise RuntimeError(f"{child.name} exited with {code}; see {child.log_path}")
        consumers = sum(1 for c in client.client_list() if c.get("cmd") == "brpop")
        if consumers >= len(children):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{len(children)} workers were not all consuming after {timeout_s} s")


def _drain(
    client: redis.Redis,
    queue: str,
    n: int,
    specs: tuple[tuple[str, str, int], ...],
    env: dict[str, str],
    work: Path,
    bare: bool = False,
) -> float:
    """Drain the backlog waiting on ``queue`` with a worker host; return events/s, counted from
    the moment the backlog became visible to workers that were all consuming."""
    held = f"{HELD}{queue}"
    client.rename(queue, held)
    with _workers(specs, env, work, bare) as children:
        wait_consuming(client, children)
        start = time.perf_counter()
        client.rename(held, queue)
        last = _wait_done(client, n, children)
    return n / (last - start)


def _worker_argv(queues: str, pool: str, concurrency: int, bare: bool) -> list[str]:
    if bare:
        return [*CELERY, "-A", "bench.bare_celery", "worker", "-Q", queues,
                "-P", pool, "-c", str(concurrency), "--without-mingle", "--without-gossip",
                "-l", "WARNING"]  # fmt: skip
    return [*CALHOOK, "worker", "-Q", queues, "-P", pool, "-c", str(concurrency),
            "--", "--without-gossip"]  # fmt: skip


@contextmanager
def _workers(
    specs: tuple[tuple[str, str, int], ...], env: dict[str, str], work: Path, bare: bool = False
) -> Iterator[list[Child]]:
    """The worker processes of a host (yielded) and, beside calhook's, a `calhook scheduler`
    as every deployment runs one: without it a retried or lost pair would never run again."""
    with ExitStack() as stack:
        children = []
        for n, (queues, pool, concurrency) in enumerate(specs):
            argv = _worker_argv(queues, pool, concurrency, bare)
            children.append(stack.enter_context(Child(f"e2e-worker-{n}", argv, env, work)))
        if not bare:
            stack.enter_context(Child("e2e-scheduler", [*CALHOOK, "scheduler"], env, work))
        yield children


def not_ok(client: redis.Redis) -> int:
    """Attempts that did not end ``ok`` (retries, dead letters): a drain that needed them is
    not the measurement it claims to be."""
    return sum(count for _, outcome, count in outcomes(client) if outcome != "ok")


@contextmanager
def _ingress(env: dict[str, str], work: Path) -> Iterator[int]:
    """A `calhook serve` on a free port, until the block exits; yields the port."""
    port = free_port()
    argv = [*CALHOOK, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with Child("e2e-ingress", argv, env, work) as ingress:
        wait_for_port(port, ingress.proc)
        yield port


def drain_calhook(scenario: Scenario, work: Path, slow_url: str) -> dict[str, Any]:
    bodies = write_bodies(fixture_bodies(), work / "bodies")
    with RedisServer(work / f"redis-{time.time_ns()}") as server:
        client = redis.Redis.from_url(server.url)
        env = _env(server.url, work, scenario.handler, slow_url)
        with _ingress(env, work) as port:
            posted = _post(port, bodies, POST_RATE, scenario.events / POST_RATE, work)
        accepted = posted["statuses"].get("202", 0)
        rate = _drain(client, DISPATCH_QUEUE, accepted, scenario.workers, env, work)
        failed = not_ok(client)
    return {"events": accepted, "rate": rate, "not_ok": failed}


def drain_bare(scenario: Scenario, work: Path, slow_url: str) -> dict[str, Any]:
    from celery import Celery

    payload = orjson.loads(fixture_bodies()[0].render("bare"))
    with RedisServer(work / f"redis-{time.time_ns()}") as server:
        client = redis.Redis.from_url(server.url)
        env = _env(server.url, work, scenario.handler, slow_url)
        sender = Celery("bare-sender", broker=server.url)
        for _ in range(scenario.events):
            sender.send_task("bare.noop", args=[payload], queue="bare")
        rate = _drain(client, "bare", scenario.events, scenario.bare_workers, env, work, True)
    return {"events": scenario.events, "rate": rate}


def latency(scenario: Scenario, work: Path, slow_url: str) -> dict[str, Any]:
    """Fixed-rate load through the whole pipeline; latency from 202 to the last handler."""
    bodies = write_bodies(fixture_bodies(), work / "bodies")
    with RedisServer(work / f"redis-{time.time_ns()}") as server:
        client = redis.Redis.from_url(server.url)
        env = _env(server.url, work, scenario.handler, slow_url)
        with _ingress(env, work) as port, _workers(scenario.workers, env, work) as children:
            wait_consuming(client, children)
            # A second of the same load first, not measured: each worker process's first events
            # pay for its lazy set-up (connections, the event loop, first imports) once.
            warm = _post(port, bodies, scenario.latency_rate, WARM_UP_S, work)
            _wait_done(client, warm["statuses"].get("202", 0), children)
            client.delete(DONE_KEY)
            posted = _post(port, bodies, scenario.latency_rate, scenario.latency_seconds, work)
            acks: list[tuple[str, float]] = [tuple(a) for a in posted["acks"]]
            _wait_done(client, len(acks), children)
        failed = not_ok(client)
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
        "not_ok": failed,
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
