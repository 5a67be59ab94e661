"""`make bench` keeps working: a quick run of every part writes a complete, error-free report.

Slow (about three minutes) and needs wrk on PATH (.ci/run installs it): CI runs it, `make
test-fast` skips it. The figures of a quick run on a shared machine mean nothing; the shape does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    # CI installs wrk and must run this test; elsewhere its absence only skips it.
    pytest.mark.skipif(
        shutil.which("wrk") is None and os.environ.get("CI") != "true",
        reason="wrk is not installed (apt-get install wrk)",
    ),
]


def test_a_quick_bench_run_measures_every_part(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, check=True, timeout=540,
    )  # fmt: skip
    report = (tmp_path / "RESULTS.md").read_text()
    for heading in (
        "## Targets",
        "## Ingress",
        "## Acknowledgement levels",
        "## End to end",
        "## Memory",
        "## Redis footprint",
    ):
        assert heading in report
    assert (tmp_path / "ingress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for server, points in results["ingress"].items():
        for point, runs in points.items():
            for run in runs:
                assert run["errors"] == 0, (server, point, run)
                assert run["rate"] > 0, (server, point, run)
    levels = results["acks"]["levels"]
    assert set(levels) == {"written", "fsynced", "replicated_everysec", "replicated_always"}
    for level, points in levels.items():
        for run in points["saturation"]:
            assert run["acked_events"] > 0, (level, run)
            # Every acknowledged event reached Redis, but what the spool still held.
            assert run["in_redis"] >= run["acked_events"] - run["left_in_spool"], (level, run)
    # The default level waits for no disk or replica: no timeout, nothing spooled. (Under the
    # others a request may wait past wrk's 2 s timeout, an error in wrk's count.)
    for run in levels["written"]["saturation"]:
        assert run["errors"] == run["spooled"] == 0, run
    assert set(results["e2e"]) == {"noop", "io", "io_async"}
    for scenario, steps in results["e2e"].items():
        for step, runs in steps.items():
            assert all(run.get("rate", 1) > 0 for run in runs), (scenario, step)
        # Every event of the backlog was accepted and drained.
        assert all(run["events"] > 0 for run in steps["drain"]), scenario
        # Every event offered in the latency run was accepted and its handler's end was read.
        assert all(run["measured"] == run["events"] > 0 for run in steps["latency"]), scenario
    assert results["e2e"]["noop"]["bare_drain"]
    assert results["memory"]["ingress"]["peak_mb"] > 0

    footprint = results["footprint"]
    queued, finished = footprint["queued"], footprint["finished"]
    # A queued event holds at least its body; a finished one none (it leaves with the last pair).
    assert queued["kinds"]["body"]["per_event"] >= footprint["body_bytes"]
    assert finished["kinds"]["body"]["keys"] == 0
    assert finished["kinds"]["messages"]["keys"] == 0
    for kind in ("state", "dedup", "trail"):
        assert finished["kinds"][kind]["keys"] == footprint["events"], kind
    assert footprint["day"]["steady"] > footprint["day"]["first_day"] > 0
