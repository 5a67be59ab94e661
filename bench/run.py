"""`make bench`: run every benchmark in one go and write bench/results/.

    python -m bench.run            # the full run (about 17 minutes on a quiet machine)
    python -m bench.run --quick    # a short smoke run of every part (about 3 minutes)
    python -m bench.run --only ingress,e2e  # the other parts' figures are kept from before
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

from bench import acks, e2e, footprint, ingress, memory, report
from bench.procs import CORES
from calhook.redis_server import find_server_binary

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("ingress", "acks", "e2e", "memory", "footprint")

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


def _earlier(path: Path, measured: set[str]) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """The parts of the results.json at ``path`` that this run did not measure: the machine
    line of the run that measured each, and their figures."""
    if not path.exists():
        return {}, {}
    earlier = json.loads(path.read_text())
    figures = {k: v for k, v in earlier["results"].items() if k not in measured}
    # A results.json from before "measured" has one run's figures, all under "machine".
    kept = {part: earlier.get("measured", {}).get(part, earlier["machine"]) for part in figures}
    return kept, figures


def write(
    out: Path, results: dict[str, Any], info: dict[str, str], describe: dict[str, str]
) -> None:
    """Write this run's ``results`` to ``out``: results.json, RESULTS.md, and ingress.png when
    the ingress was measured.

    A run of some parts keeps the other parts' figures of the results.json already in ``out``,
    each with the machine line of the run that measured it, so the report stays whole.
    """
    kept, kept_results = _earlier(out / "results.json", set(results))
    merged = {part: {**kept_results, **results}[part] for part in PARTS if part in kept | results}
    measured = {**kept, **dict.fromkeys(results, info)}
    (out / "results.json").write_text(
        json.dumps({"machine": info, "measured": measured, "results": merged}, indent=1)
    )
    (out / "RESULTS.md").write_text(report.markdown(merged, info, describe, kept) + "\n")
    if "ingress" in results:
        report.plot(results, out / "ingress.png")


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
    if shutil.which("wrk") is None and parts & {"ingress", "acks"}:
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
    if "acks" in parts:
        # 4 s a point: a level that confirms at the server's next fsync or a replica's
        # once-a-second acknowledgement gets several of them into each.
        results["acks"] = acks.run(
            acks.Config(rounds=1 if quick else 3, seconds=2 if quick else 4), progress
        )
    if "e2e" in parts:
        results["e2e"] = e2e.run(scenarios, 1 if quick else 3, progress)
    if "memory" in parts:
        results["memory"] = memory.run(20 if quick else 300, 150, NOOP_WORKERS, progress)
    if "footprint" in parts:
        results["footprint"] = footprint.run(500 if quick else 2000, NOOP_WORKERS, progress)

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run" + (" --quick" if quick else "")
    if parts != set(PARTS):
        command += f" --only {','.join(p for p in PARTS if p in parts)}"
    describe = {s.name: s.describe() for s in scenarios}
    info = machine(command)
    write(args.out, results, info, describe)
    progress(f"wrote {args.out}/RESULTS.md")
    if args.readme:
        report.update_readme(Path(__file__).resolve().parent.parent / "README.md",
                             (args.out / "RESULTS.md").read_text())  # fmt: skip
        progress("quoted it in README.md (Performance)")
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
