"""Memory: the ingress and one worker under a sustained load, their RSS sampled throughout.

The pipeline (ingress, a worker with the no-op handler) takes a steady offered rate for the
whole run; the RSS of the ingress process and of the worker (main process and pool children)
is sampled every few seconds. Growth compares the last fifth of the run with the second fifth,
after start-up and warm-up.

The workers run with a one-minute task time limit instead of the default five. Celery's worker
process arms a timer for each task's hard time limit; a finished task cancels it, but the entry
stays in the timer heap until its time comes, so the main process grows by about half a
kilobyte per task until the first limit passes, then holds steady at rate × limit entries (a bare
Celery worker does the same). With the default limit that plateau comes at the end of a
five-minute run; with one minute the run shows it.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.e2e import _env, _workers
from bench.fixtures import fixture_bodies
from bench.ingress import SECRET
from bench.loadgen import write_bodies
from bench.procs import BIN, CALHOOK, ROOT, Child, wait_for_port
from calhook.redis_server import RedisServer, free_port

SAMPLE_S = 2.0
TIME_LIMITS = {"CALHOOK_TASK_TIME_LIMIT_S": "60", "CALHOOK_VISIBILITY_TIMEOUT_S": "120"}


def run(seconds: float, rate: int, workers: tuple[tuple[str, str, int], ...], progress: Any
        ) -> dict[str, Any]:  # fmt: skip
    samples: dict[str, list[tuple[float, int]]] = {"ingress": [], "worker": []}
    with tempfile.TemporaryDirectory(prefix="calhook-mem-") as tmp:
        work = Path(tmp)
        bodies = write_bodies(fixture_bodies(), work / "bodies")
        with RedisServer(work / "redis") as server:
            env = _env(server.url, work, "noop", "")
            env.update(TIME_LIMITS)
            port = free_port()
            argv = [*CALHOOK, "serve", "--host", "127.0.0.1", "--port", str(port)]
            with (
                Child("mem-ingress", argv, env, work) as ingress,
                _workers(workers, env, work) as worker_children,
            ):
                wait_for_port(port, ingress.proc)
                time.sleep(3)
                load = subprocess.Popen(
                    [str(BIN / "python"), "-m", "bench.loadgen", "--port", str(port),
                     "--rate", str(rate), "--duration", str(seconds), "--bodies", str(bodies),
                     "--secret", SECRET, "--connections", "16", "--out", str(work / "m.json")],
                    cwd=ROOT,
                )  # fmt: skip
                stop = threading.Event()
                started = time.monotonic()
                while load.poll() is None:
                    now = time.monotonic() - started
                    samples["ingress"].append((now, ingress.rss_bytes()))
                    samples["worker"].append((now, sum(w.rss_bytes() for w in worker_children)))
                    stop.wait(SAMPLE_S)
                if load.returncode != 0:
                    raise RuntimeError(f"load generator exited with {load.returncode}")
    result: dict[str, Any] = {"seconds": seconds, "rate": rate, "samples": samples}
    for name, series in samples.items():
        rss = [value for _, value in series]
        fifth = max(1, len(rss) // 5)
        early = statistics.median(rss[fifth : 2 * fifth])
        late = statistics.median(rss[-fifth:])
        result[name] = {
            "peak_mb": max(rss) / 2**20,
            "early_mb": early / 2**20,
            "late_mb": late / 2**20,
            "growth_pct": 100 * (late - early) / early,
        }
        progress(f"memory {name:8}: peak {max(rss) / 2**20:.1f} MB, "
                 f"{early / 2**20:.1f} → {late / 2**20:.1f} MB")  # fmt: skip
    return result
