"""Real ``calhook`` processes (a Celery worker, the scheduler) with their log lines readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.leaks import register_log
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
TEST_HANDLER_MODULES = "workers.tasks.audit,tests.support.recording"
# A compressed clock for the retry schedule: four attempts within about a second.
TEST_ENV = {
    "CALHOOK_HANDLER_MODULES": TEST_HANDLER_MODULES,
    "CALHOOK_LOG_FORMAT": "json",
    "CALHOOK_LOG_LEVEL": "INFO",
    "CALHOOK_RETRY_SCHEDULE_S": "0.1,0.2,0.3",
    "CALHOOK_RETRY_JITTER": "0",
    "CALHOOK_SCHEDULER_INTERVAL_S": "0.05",
    "CALHOOK_MAX_DELIVERIES": "3",
    # A worker killed mid-run is noticed within seconds, not a minute.
    "CALHOOK_LEASE_S": "3",
    "CALHOOK_RECOVERY_S": "2",
    "CALHOOK_ORDER_WAIT_S": "0.2",
    # Tests make handlers fail on purpose, many in a row: the breaker would hold them. The tests
    # of the breaker switch it on (tests/faults/test_outage.py).
    "CALHOOK_BREAKER_FAILURES": "0",
}


class CalhookProcess:
    """``calhook <args>`` as a child process in its own session, logging to ``log_path``."""

    ready_marker = ""

    def __init__(self, args: list[str], redis_url: str, log_path: Path, **env: str) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "REDIS_URL": redis_url, **TEST_ENV, **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CalhookProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The session's leak scan reads every process's log at the end (tests/conftest.py).
        register_log(self.log_path)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "calhook", *self.args],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, timeout_s=60, what=f"`calhook {' '.join(self.args)}` to be ready")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"process exited: {self.log_path.read_text()[-3000:]}")
        return any(self.ready_marker in line.get("msg", "") for line in self.lines())

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the Celery banner and other text is skipped). A
        line for a batch (``event_ids``) stands for each of its events: it is read as one line
        per event, with that event's ``event_id``."""
        found = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                ids = line.get("event_ids")
                if isinstance(ids, list) and "event_id" not in line:
                    found += [{**line, "event_id": event_id} for event_id in ids]
                else:
                    found.append(line)
        return found

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process and its children."""
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


class WorkerProcess(CalhookProcess):
    """``calhook worker`` (prefork) on every queue."""

    ready_marker = " ready."

    def __init__(self, redis_url: str, log_path: Path, concurrency: int = 2, **env: str) -> None:
        super().__init__(["worker", "-c", str(concurrency)], redis_url, log_path, **env)


class SchedulerProcess(CalhookProcess):
    """``calhook scheduler``."""

    ready_marker = "scheduler started"

    def __init__(self, redis_url: str, log_path: Path, **env: str) -> None:
        super().__init__(["scheduler"], redis_url, log_path, **env)
