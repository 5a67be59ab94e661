"""The heartbeat: a worker process keeps the leases of the pairs it is running.

A started pair is owned for ``CALHOOK_LEASE_S``; while its handler runs, a thread renews every
lease this process holds (and the order locks that go with them) every third of that, in one
round trip. A process that dies stops renewing, and the scheduler's sweep queues its pairs again
once their leases run out. One owner token per process: after a fork (Celery's prefork pool)
the child gets its own token and its own thread.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

import redis

from calhook.store.pairs import PairStore

log = logging.getLogger("calhook.worker")


class Heartbeat:
    """Leases held by this process, renewed in the background."""

    def __init__(self, pairs: PairStore, lease_s: float) -> None:
        self._pairs = pairs
        self._interval_s = lease_s / 3
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._pid = 0
        self._owner = ""
        self._stop = threading.Event()

    @property
    def owner(self) -> str:
        """This process's owner token (new after a fork)."""
        self._after_fork()
        return self._owner

    def hold(self, *members: str) -> None:
        """Renew the leases of ``members`` (``<event id>/<pair>``) until :meth:`release`."""
        self._after_fork()
        with self._lock:
            self._held.update(members)

    def release(self, *members: str) -> None:
        """Stop renewing ``members``."""
        with self._lock:
            self._held.difference_update(members)

    def _after_fork(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._owner = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"
        self._held = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="calhook-heartbeat", daemon=True).start()

    def _run(self) -> None:
        stop, owner = self._stop, self._owner
        while not stop.wait(self._interval_s):
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            try:
                lost = self._pairs.renew(owner, held)
            except redis.RedisError as exc:
                log.warning("heartbeat cannot reach redis", extra={"error": repr(exc)})
                continue
            if lost:
                # Finished by another copy, forgotten, or taken over after a stall longer than
                # the lease: this run's outcome will be refused (store/lua/finish.lua).
                log.warning("lease lost", extra={"pairs": lost[:20]})

    def stop(self) -> None:
        """End the renewing thread (tests, shutdown)."""
        self._stop.set()
