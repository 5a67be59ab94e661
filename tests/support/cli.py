"""Running ``calhook`` as people do, against a given Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def calhook(redis_url: str, *args: str) -> str:
    """``calhook ARGS…`` with REDIS_URL set; its standard output (a failure raises)."""
    return subprocess.run(
        [sys.executable, "-m", "calhook", *args],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
