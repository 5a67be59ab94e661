"""The handler registry: which functions react to which event types, on which queue.

A team adds a reaction by writing a module and listing it in ``CALHOOK_HANDLER_MODULES``::

    from workers.registry import HandlerContext, handler
    from schemas import CustomerEvent

    @handler("customer.created", "customer.updated", queue="crm", name="crm.sync_customer")
    def sync_customer(event: CustomerEvent, ctx: HandlerContext) -> None:
        ...

Each (event, handler) pair becomes a task of its own on the handler's queue, so handlers retry
and fail independently. A name is registered once; a second registration fails at import, so two
modules can never silently compete for the same work.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from workers.errors import DuplicateHandler, HandlerModuleError, UnknownHandler

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a handler knows about the delivery besides the event itself."""

    event_id: str
    handler: str
    endpoint: str
    received_at: float
    attempt: int = 1

    @property
    def idempotency_key(self) -> str:
        """A key unique per (event, handler), stable across retries; pass it to outside systems."""
        return f"{self.event_id}:{self.handler}"


# A plain function, or an ``async def`` one: async handlers run on the worker process's event
# loop (workers/loop.py), the events of a batch concurrently, at most ``concurrency`` at once.
HandlerFn = Callable[[Any, HandlerContext], None] | Callable[[Any, HandlerContext], Awaitable[None]]
# (event, event_id) → its version for ordering (workers.ordering.Version), or None.
OrderKey = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a handler's failures are retried; unset fields take the settings' values.

    ``quick_retries`` in-call retries (seconds apart) for transient errors, then one attempt per
    delay of ``schedule_s``, then the dead-letter store. Exceptions of a ``permanent`` type skip
    the schedule, as :class:`~workers.errors.PermanentError` always does.
    """

    quick_retries: int | None = None
    schedule_s: tuple[float, ...] | None = None
    permanent: tuple[type[BaseException], ...] = ()


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler."""

    name: str
    event_types: frozenset[str]
    queue: str
    fn: HandlerFn
    retry: RetryPolicy = RetryPolicy()
    ordered: bool = False
    order_key: OrderKey | None = None
    order_scope: str | None = None
    concurrency: int | None = None
    # The circuit whose breaker holds it: its own name, or a destination shared with others.
    circuit: str = ""

    @property
    def breaker_circuit(self) -> str:
        return self.circuit or self.name

    @property
    def is_async(self) -> bool:
        """Whether the handler is an ``async def`` (run on the process's event loop)."""
        return inspect.iscoroutinefunction(self.fn)


class Registry:
    """Handlers by name and by event type."""

    def __init__(self) -> None:
        self._by_name: dict[str, Handler] = {}
        self._by_type: defaultdict[str, list[Handler]] = defaultdict(list)

    def register(self, handler: Handler) -> Handler:
        """Add ``handler``; raises DuplicateHandler if its name is taken."""
        if handler.name in self._by_name:
            raise DuplicateHandler(f"a handler named {handler.name!r} is already registered")
        if not _NAME.match(handler.name) or not _NAME.match(handler.queue):
            raise ValueError(f"handler name and queue must match {_NAME.pattern}")
        if handler.circuit and not _NAME.match(handler.circuit):
            raise ValueError(f"a circuit's name must match {_NAME.pattern}")
        if not handler.event_types:
            raise ValueError(f"handler {handler.name!r} names no event type")
        self._by_name[handler.name] = handler
        for event_type in sorted(handler.event_types):
            self._by_type[event_type].append(handler)
        return handler

    def handler(
        self,
        *event_types: str,
        queue: str,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        ordered: bool = False,
        order_key: OrderKey | None = None,
        order_scope: str | None = None,
        concurrency: int | None = None,
        circuit: str | None = None,
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Register the decorated function for ``event_types`` on ``queue``.

        ``ordered=True`` runs it only for events newer than the last it applied to the same
        customer or appointment (:mod:`workers.ordering`). ``order_key`` picks another entity
        (e.g. the customer of a booking); handlers with the same ``order_scope`` share versions,
        so that one's older event does not undo another's newer one.

        The function may be ``async def``: the events of a batch then run concurrently on the
        worker process's event loop, at most ``concurrency`` at once (default
        ``CALHOOK_ASYNC_CONCURRENCY``), each under the handler's rate limit if it has one.

        ``circuit`` names the destination whose breaker holds it (default: its own name):
        handlers calling the same service share one, so its outage holds them all at once.
        """
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")

        def decorate(fn: HandlerFn) -> HandlerFn:
            self.register(
                Handler(
                    name or fn.__name__,
                    frozenset(event_types),
                    queue,
                    fn,
                    retry or RetryPolicy(),
                    ordered or order_key is not None,
                    order_key,
                    order_scope,
                    concurrency,
                    circuit or "",
                )
            )
            return fn

        return decorate

    def for_type(self, event_type: str) -> tuple[Handler, ...]:
        """The handlers of ``event_type``, in registration order."""
        return tuple(self._by_type.get(event_type, ()))

    def get(self, name: str) -> Handler:
        """The handler called ``name``; raises UnknownHandler if none is loaded."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownHandler(f"no handler named {name!r} is loaded") from None

    def circuit(self, name: str) -> tuple[str, ...]:
        """The handlers whose breaker is circuit ``name``."""
        return tuple(h.name for h in self._by_name.values() if h.breaker_circuit == name)

    def queues(self) -> frozenset[str]:
        """Every queue some handler uses."""
        return frozenset(h.queue for h in self._by_name.values())

    def __iter__(self) -> Iterator[Handler]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


registry = Registry()
"""The process-wide registry that :func:`handler` adds to and the workers read."""

handler = registry.handler


def load_modules(modules: Iterable[str]) -> None:
    """Import each handler module, so that its decorators register with :data:`registry`."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise HandlerModuleError(
                f"cannot import handler module {module!r} (CALHOOK_HANDLER_MODULES): {exc}"
            ) from exc
