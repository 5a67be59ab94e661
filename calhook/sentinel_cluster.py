"""A real Redis Sentinel topology on localhost: a master, its replicas and three sentinels, each
a child process of the same binary as :class:`~calhook.redis_server.RedisServer`; for
``calhook dev --sentinel`` and the failover tests.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal

from calhook.redis_server import (
    HOST,
    Address,
    RedisServer,
    RedisServerError,
    ask,
    config_quote,
    fields,
    find_server_binary,
    free_ports,
)


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
                f"port {self.port}\nbind {HOST}\ndir {config_quote(here)}\n"
                f"logfile {config_quote(here / self.log_file.name)}\n{self._monitor}"
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
                replica_of=(HOST, master.port),
                extra_args=fast_sync,
            )
            for i in range(1, 1 + replicas)
        ]
        self._sentinels = [
            SentinelServer(
                data_dir / f"sentinel-{i}",
                (HOST, master.port),
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
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
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
            info = ask(replica.port, "INFO", "replication") or {}
            if info.get("master_link_status") != "up":
                return f"replica {HOST}:{replica.port} is not in sync; see {replica.log_file}"
        return None

    def _sentinels_lag(self) -> str | None:
        """What a sentinel does not know yet (master, replicas, other sentinels), or None."""
        master = self._servers[0]
        for sentinel in self._sentinels:
            where = f"sentinel {HOST}:{sentinel.port} (see {sentinel.log_file})"
            state = fields(ask(sentinel.port, "SENTINEL", "MASTER", self.master_name))
            if state.get("flags") != "master" or state.get("port") != str(master.port):
                return f"{where} does not see master {HOST}:{master.port} up: {state}"
            if state["num-slaves"] != str(len(self._servers) - 1):
                return f"{where} knows {state['num-slaves']} replicas"
            if state["num-other-sentinels"] != str(len(self._sentinels) - 1):
                return f"{where} knows {state['num-other-sentinels']} other sentinels"
            replicas = ask(sentinel.port, "SENTINEL", "REPLICAS", self.master_name) or []
            for replica in map(fields, replicas):
                if replica["flags"] != "slave" or replica["master-link-status"] != "ok":
                    return f"{where} sees replica {replica['name']} as {replica['flags']}"
        return None

    def _reports(self) -> list[Address]:
        """The master address each running sentinel that answers reports, in sentinel order."""
        reports = []
        for sentinel in self._sentinels:
            if sentinel.running:
                reply = ask(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
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
            if (HOST, server.port) == address:
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
                role = ask(address[1], "ROLE")
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
