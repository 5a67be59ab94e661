"""Child processes of a benchmark: started pinned to a core, waited for, measured, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# `python -m`, as the tests start them: it does not depend on the console scripts' #! lines.
CALHOOK = (str(BIN / "python"), "-m", "calhook")
CELERY = (str(BIN / "python"), "-m", "celery")
CORES = sorted(os.sched_getaffinity(0))
# The server under test gets its own core; the load generator and Redis share the other one.
SERVER_CORE = CORES[0]
LOAD_CORE = CORES[-1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout_s} s")


class Child:
    """A child process, optionally pinned to some cores, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        log_dir: Path,
        cores: Sequence[int] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(
            list(argv), env=full_env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        if cores is not None and len(CORES) > 1:
            os.sched_setaffinity(self.proc.pid, set(cores))
        self.ps = psutil.Process(self.proc.pid)

    def pin_tree(self, cores: Sequence[int]) -> None:
        """Pin the process and its children (a prefork pool) to ``cores``."""
        if len(CORES) < 2:
            return
        for p in [self.ps, *self.ps.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.cpu_affinity(list(cores))

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        total = 0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(app: Any, port: int) -> None:
    """Run ``app`` as ``calhook serve`` runs the ingress: uvloop, no access log, SO_REUSEPORT,
    and the same aiohttp server limits (ingest.server.server_options)."""
    import uvloop
    from aiohttp import web

    from calhook.settings import load_settings
    from ingest.server import server_options

    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, reuse_port=True,
                **server_options(load_settings()))  # fmt: skip
