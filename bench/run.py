"""`make bench`: run every benchmark in one go and write bench/results/.

    python -m bench.run            # the full run (about 15 minutes on a quiet machine)
    python -m bench.run --quick    # a short smoke run of every part (about 2 minutes)
    python -m bench.run --only ingress,e2e
    python -m bench.run --readme   # and quote the report in README.md's Performance section

Writes RESULTS.md (the tables quoted in the README), results.json (every run's figures) and
ingress.png. Needs wrk on PATH (Debian: apt-get install wrk) and the fixtures in ../shared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies

from bench import e2e, footprint, ingress, memory, report
from bench.procs import CORES
from calhook.redis_server import find_server_binary

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("ingress", "e2e", "memory", "footprint")

# The worker host of each end-to-end scenario: (queues, pool, concurrency) per worker process.
# One worker process per core: each Celery worker's consumer (its main process: BRPOP, unacked
# bookkeeping, acks) is single-threaded and was the busiest process of a one-worker host; two
# processes were faster than one with two children for calhook and for the bare task alike.
NOOP_WORKERS = (("dispatch,bench", "prefork", 1), ("dispatch,bench", "prefork", 1))
BARE_WORKERS = (("bare", "prefork", 1), ("bare", "prefork", 1))
# A sync handler that waits on I/O: threads, so one process waits on many calls at once (the GIL
# is released while waiting); a prefork child waits on one.
IO_WORKERS = (("dispatch,bench", "threads", 48), ("dispatch,bench", "threads", 48))
# An async handler: each pool child runs the events of its batch concurrently on its own event
# loop (workers/loop.py), up to 64 in flight; four prefork children keep four batches in flight
# (256 calls, where a 50 ms call at 2,000 events/s needs 100), on one loop each. Measured side by
# side on 2026-12-02 (a 8,000-event drain): prefork x4 1,288/s, 2 x prefork x2 1,182/s,
# 2 x threads x4 631/s (the pool's threads and the loop share one GIL and one process).
ASYNC_WORKERS = (("dispatch,bench", "prefork", 4),)


def machine(command: str) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with Path("/proc/cpuinfo").open() as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(
        [find_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split(" sha=")[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(len(CORES)),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "redis": redis_version,
        "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, one round")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--readme", action="store_true", help="also quote the report in README.md's Performance"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        sys.exit(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    if shutil.which("wrk") is None and "ingress" in parts:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    quick = args.quick
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {line}", flush=True)

    # Each drain is a backlog of this many events: large enough for batches to form and for a
    # drain at 2,000 events/s to last seconds.
    backlog = 500 if quick else 5000
    rate, seconds = (50, 2.0) if quick else (100, 6.0)
    scenarios = [
        e2e.Scenario("noop", "noop", NOOP_WORKERS, backlog, rate, seconds, BARE_WORKERS),
        e2e.Scenario("io", "io", IO_WORKERS, backlog, rate, seconds),
        e2e.Scenario("io_async", "io_async", ASYNC_WORKERS, backlog, rate, seconds),
    ]
    results: dict[str, Any] = {}
    if "ingress" in parts:
        config = ingress.Config(
            rounds=1 if quick else 3, seconds=1 if quick else 3, rates=(500, 1000, 2000)
        )
        results["ingress"] = ingress.run(config, progress)
    if "e2e" in parts:
        results["e2e"] = e2e.run(scenarios, 1 if quick else 3, progress)
    if "memory" in parts:
        results["memory"] = memory.run(20 if quick else 300, 150, NOOP_WORKERS, progress)
    if "footprint" in parts:
        results["footprint"] = footprint.run(500 if quick else 2000, NOOP_WORKERS, progress)

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run" + (" --quick" if quick else "")
    describe = {s.name: s.describe() for s in scenarios}
    info = machine(command)
    (args.out / "results.json").write_text(
        json.dumps({"machine": info, "results": results}, indent=1)
    )
    (args.out / "RESULTS.md").write_text(report.markdown(results, info, describe) + "\n")
    if "ingress" in results:
        report.plot(results, args.out / "ingress.png")
    progress(f"wrote {args.out}/RESULTS.md")
    if args.readme:
        report.update_readme(Path(__file__).resolve().parent.parent / "README.md",
                             (args.out / "RESULTS.md").read_text())  # fmt: skip
        progress("quoted it in README.md (Performance)")
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
