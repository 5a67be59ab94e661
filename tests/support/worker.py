"""A real ``calhook worker`` (Celery, prefork) as a child process, with its log lines readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
TEST_HANDLER_MODULES = "workers.tasks.audit,tests.support.recording"


class WorkerProcess:
    """``calhook worker`` on every queue, logging JSON lines to ``log_path``."""

    def __init__(self, redis_url: str, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "CALHOOK_HANDLER_MODULES": TEST_HANDLER_MODULES,
            "CALHOOK_LOG_FORMAT": "json",
            "CALHOOK_LOG_LEVEL": "INFO",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, concurrency: int = 2) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "calhook", "worker", "-c", str(concurrency)],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, timeout_s=60, what="the worker to be ready")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
        return any(" ready." in line.get("msg", "") for line in self.lines())

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the Celery banner and other text is skipped)."""
        found = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    found.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue
        return found

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
