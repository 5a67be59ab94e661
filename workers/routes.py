"""Routes you can see: every worker tells Redis which handlers it serves, and ``calhook handlers``
puts the fleet's answers side by side.

A worker publishes, at start and every :data:`PUBLISH_EVERY_S`, what it loaded (each handler's
name, types, queue, sync or async, circuit, module and the version of the package it came from,
and the handlers it loaded but does not run, with why) and the queues it consumes. The entry
expires when the worker stops refreshing it. :func:`problems` reads the entries together and
names what would lose or park work:

- a handler some worker serves that no dispatching worker knows: dispatch routes by its own
  registry, so no event reaches it, and one no other handler takes is parked as ``no_handler``
  (a module listed only on the new queue's worker);
- a queue a dispatching worker routes to that no worker consumes: its events would wait for ever;
- two workers that disagree about a handler (types, queue, version): events are routed by one
  and run by the other.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from calhook.store.keys import DISPATCH_QUEUE, ROUTE, ROUTES
from workers.registry import Handler, Registry

log = logging.getLogger("calhook.worker")

PUBLISH_EVERY_S = 30.0
# An entry outlives three missed refreshes: a worker that stopped is gone within two minutes.
TTL_S = int(PUBLISH_EVERY_S * 4)


def worker_id() -> str:
    """This worker's name in the routes: its host and its main process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def package_of(module: str) -> str:
    """``name version`` of the installed distribution that ships ``module``, or ``""``."""
    for dist in _distributions().get(module.split(".", 1)[0], []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _handler(h: Handler) -> dict[str, Any]:
    return {
        "name": h.name,
        "types": sorted(h.event_types),
        "queue": h.queue,
        "async": h.is_async,
        "circuit": h.breaker_circuit,
        "module": h.module,
        "package": package_of(h.module),
    }


def describe(registry: Registry, queues: Iterable[str], worker: str) -> dict[str, Any]:
    """What a worker publishes: its handlers (and those it loaded but does not run) and the
    queues it consumes."""
    return {
        "worker": worker,
        "queues": sorted(queues),
        "handlers": [_handler(h) for h in registry],
        "inactive": {name: why for name, (_, why) in sorted(registry.inactive.items())},
        "at": round(time.time(), 3),
    }


def publish(client: redis.Redis, description: dict[str, Any]) -> None:
    """Write one worker's entry (it expires unless published again)."""
    worker = description["worker"]
    with client.pipeline(transaction=False) as pipe:
        pipe.set(f"{ROUTE}{worker}", orjson.dumps(description), ex=TTL_S)
        pipe.zadd(ROUTES, {worker: time.time()})
        pipe.execute()


def withdraw(client: redis.Redis, worker: str) -> None:
    """Remove a stopping worker's entry."""
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(f"{ROUTE}{worker}")
        pipe.zrem(ROUTES, worker)
        pipe.execute()


class Publisher:
    """Publishes a worker's routes from a thread until stopped."""

    def __init__(self, client: redis.Redis, description: dict[str, Any]) -> None:
        self._client = client
        self._description = description
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calhook-routes", daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            withdraw(self._client, self._description["worker"])
        except redis.RedisError as exc:
            log.warning("cannot withdraw the routes", extra={"error": repr(exc)})

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                publish(self._client, {**self._description, "at": round(time.time(), 3)})
            except redis.RedisError as exc:
                log.warning("cannot publish the routes", extra={"error": repr(exc)})
            else:
                if first:
                    log.info("routes published", extra={"worker": self._description["worker"]})
                    first = False
            self._stop.wait(PUBLISH_EVERY_S)


@dataclass(frozen=True, slots=True)
class Route:
    """One event type's handler on one queue, and the workers that serve it."""

    event_type: str
    handler: str
    queue: str
    served_by: tuple[str, ...]
    known_by: tuple[str, ...] = field(default=())


def read(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's entry, by worker name; stale index members are dropped."""
    names = [n.decode() for n in client.zrange(ROUTES, 0, -1)]  # type: ignore[union-attr]
    if not names:
        return []
    raw: list[bytes | None] = client.mget([f"{ROUTE}{n}" for n in names])  # type: ignore[assignment]
    gone = [n for n, r in zip(names, raw, strict=True) if r is None]
    if gone:
        client.zrem(ROUTES, *gone)
    return sorted((orjson.loads(r) for r in raw if r is not None), key=lambda w: w["worker"])


def dispatchers(workers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers that consume the dispatch queue (and so decide where events go)."""
    return [w for w in workers if DISPATCH_QUEUE in w["queues"]]


def routes(workers: Sequence[dict[str, Any]]) -> list[Route]:
    """Type → handler → queue, with the workers consuming the queue that run the handler, and
    the dispatching workers that know it."""
    known: dict[tuple[str, str, str], set[str]] = {}
    served: dict[tuple[str, str, str], set[str]] = {}
    dispatching = {w["worker"] for w in dispatchers(workers)}
    for w in workers:
        for h in w["handlers"]:
            for event_type in h["types"]:
                key = (event_type, h["name"], h["queue"])
                if w["worker"] in dispatching:
                    known.setdefault(key, set()).add(w["worker"])
                if h["queue"] in w["queues"]:
                    served.setdefault(key, set()).add(w["worker"])
    out = []
    for key in sorted(set(known) | set(served)):
        by = tuple(sorted(served.get(key, ())))
        out.append(Route(*key, served_by=by, known_by=tuple(sorted(known.get(key, ())))))
    return out


def problems(workers: Sequence[dict[str, Any]]) -> list[str]:
    """What would park, strand or split work, one line each; empty when the fleet agrees."""
    found: list[str] = []
    dispatching = dispatchers(workers)
    names = ", ".join(w["worker"] for w in dispatching) or "none"
    if not dispatching and workers:
        found.append("no worker consumes the dispatch queue: no event is routed")
    routed: dict[str, set[str]] = {}  # handler -> queues the dispatchers route it to
    for w in dispatching:
        for h in w["handlers"]:
            routed.setdefault(h["name"], set()).add(h["queue"])
    consumed = {q for w in workers for q in w["queues"]}
    for w in workers:
        for h in w["handlers"]:
            if dispatching and h["name"] not in routed and h["queue"] in w["queues"]:
                found.append(_unrouted(h["name"], h["queue"], w["worker"], dispatching, names))
    for handler, queues in sorted(routed.items()):
        for queue in sorted(queues - consumed):
            found.append(
                f"queue {queue} (handler {handler}) is consumed by no worker: its events wait. "
                f"Run `calhook worker -Q {queue}`."
            )
        for queue in sorted(queues & consumed):
            # Routed there, but a worker taking its messages does not run it: what that worker
            # takes is dead-lettered as unknown_handler.
            consumers = [w for w in workers if queue in w["queues"]]
            lacking, why = _not_running(consumers, handler)
            if lacking:
                found.append(
                    f"{handler} is routed to queue {queue}, but {', '.join(lacking)} consume "
                    f"it without running it ({why}): what they take is dead-lettered as "
                    f"unknown_handler. Configure and install it the same on every worker of "
                    f"the queue."
                )
    # Dispatching workers that disagree: only the events one of them dispatches reach it.
    for handler in sorted(routed):
        missing, why = _not_running(dispatching, handler)
        if missing:
            found.append(
                f"{handler} is routed by some dispatching workers but not by {', '.join(missing)}"
                f" ({why}): the events those dispatch never reach it."
            )
    found += _disagreements(workers)
    return list(dict.fromkeys(found))


def _not_running(workers: Sequence[dict[str, Any]], handler: str) -> tuple[list[str], str]:
    """Which of ``workers`` do not run ``handler``, and why (``worker: reason``, joined)."""
    lacking = [w for w in workers if handler not in {h["name"] for h in w["handlers"]}]
    why = "; ".join(
        f"{w['worker']}: {w['inactive'].get(handler, 'not installed')}" for w in lacking
    )
    return [w["worker"] for w in lacking], why


def _unrouted(
    name: str, queue: str, worker: str, dispatching: Sequence[dict[str, Any]], names: str
) -> str:
    """Why the dispatch does not route to a handler that ``worker`` runs, and what to do."""
    why = {w["inactive"].get(name) for w in dispatching} - {None}
    lead = f"{name} runs on {worker} (queue {queue}), but the dispatching workers ({names})"
    tail = "no event is routed to it (one with no other handler is parked as no_handler)"
    if why == {"not configured"}:
        return (f"{lead} load it unconfigured, so {tail}. Give them its configuration too: its "
                f"enabled= must answer the same on every worker.")  # fmt: skip
    if "switched off" in why:
        return (f"{lead} switch it off (CALHOOK_HANDLER_MODULES -NAME), so {tail}. Switch it "
                f"off everywhere, or nowhere.")  # fmt: skip
    return (f"{lead} do not know it: {tail}. Install its package, or list its module, where the "
            f"dispatch runs too.")  # fmt: skip


def _disagreements(workers: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, dict[tuple[Any, ...], list[str]]] = {}
    for w in workers:
        for h in w["handlers"]:
            shape = (tuple(h["types"]), h["queue"], h["package"])
            seen.setdefault(h["name"], {}).setdefault(shape, []).append(w["worker"])
    out = []
    for name, shapes in sorted(seen.items()):
        if len(shapes) > 1:
            parts = [
                f"{', '.join(ws)}: queue {q}, {len(types)} types{f', {pkg}' if pkg else ''}"
                for (types, q, pkg), ws in shapes.items()
            ]
            out.append(f"workers disagree about {name}: " + "; ".join(parts))
    return out
