"""The handler registry: which functions react to which event types, on which queue.

A team adds a reaction by writing a module that registers functions::

    from workers.registry import HandlerContext, handler
    from schemas import CustomerEvent

    @handler("customer.created", "customer.updated", queue="crm", name="crm.sync_customer")
    def sync_customer(event: CustomerEvent, ctx: HandlerContext) -> None:
        ...

and making it known to every worker, in one of two ways (:func:`load_handlers`):

- an entry point of the group ``calhook.handlers`` in its distribution's metadata: installed
  where the workers run, it is loaded by all of them, the dispatching ones included;
- ``CALHOOK_HANDLER_MODULES``, which adds modules to the built-in ones (``audit``, ``crm``,
  ``notify``) and those installed, and switches one off by its name with a leading ``-`` (a
  module, a built-in or entry point name, or a handler).

Each (event, handler) pair becomes a task of its own on the handler's queue, so handlers retry
and fail independently. A name is registered once; a second registration fails at import, so two
modules can never silently compete for the same work. A handler whose event parameter cannot
take the events of its types fails at import too. Whether a handler runs at all is decided by
its ``enabled=`` predicate on the settings, when the handlers are loaded, never by a module
reading the environment as it is imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import re
import types
import typing
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas import CalensoEvent, UnknownEvent, family_of
from schemas.events import MODEL_BY_FAMILY
from workers.errors import (
    DuplicateHandler,
    HandlerModuleError,
    HandlerSignatureError,
    UnknownHandler,
)

if TYPE_CHECKING:
    from calhook.settings import Settings

log = logging.getLogger("calhook.worker")

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
# Whether a handler runs with these settings; it may raise a SettingsError for a configuration
# that is there but wrong (a bad SMTP URL), so that the worker does not start.
Enabled = Callable[["Settings"], bool]

# calhook's own handler modules, loaded with whatever is installed and listed.
BUILTIN_MODULES = ("workers.tasks.audit", "workers.tasks.crm", "workers.tasks.notify")
ENTRY_POINT_GROUP = "calhook.handlers"


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
    enabled: Enabled | None = field(default=None, compare=False)

    @property
    def breaker_circuit(self) -> str:
        return self.circuit or self.name

    @property
    def module(self) -> str:
        """The module that registered it."""
        return str(getattr(self.fn, "__module__", "") or "")

    @property
    def is_async(self) -> bool:
        """Whether the handler is an ``async def`` (run on the process's event loop)."""
        return inspect.iscoroutinefunction(self.fn)


class Registry:
    """Handlers by name and by event type."""

    def __init__(self) -> None:
        self._by_name: dict[str, Handler] = {}
        self._by_type: defaultdict[str, list[Handler]] = defaultdict(list)
        # Handlers registered but not run here, and why ("switched off", "not configured").
        self.inactive: dict[str, tuple[Handler, str]] = {}

    def register(self, handler: Handler) -> Handler:
        """Add ``handler``; raises DuplicateHandler if its name is taken, and
        HandlerSignatureError if its event parameter cannot take the events of its types."""
        if handler.name in self._by_name or handler.name in self.inactive:
            raise DuplicateHandler(f"a handler named {handler.name!r} is already registered")
        if not _NAME.match(handler.name) or not _NAME.match(handler.queue):
            raise ValueError(f"handler name and queue must match {_NAME.pattern}")
        if handler.circuit and not _NAME.match(handler.circuit):
            raise ValueError(f"a circuit's name must match {_NAME.pattern}")
        if not handler.event_types:
            raise ValueError(f"handler {handler.name!r} names no event type")
        check_signature(handler)
        self._by_name[handler.name] = handler
        for event_type in sorted(handler.event_types):
            self._by_type[event_type].append(handler)
        return handler

    def activate(
        self, settings: Settings, off: Iterable[str] = (), *, tolerant: bool = False
    ) -> None:
        """Keep only the handlers that run with ``settings``: not switched off (by their name or
        their module's) and enabled by their predicate. A predicate's error propagates, unless
        ``tolerant``: then its handler is dropped as misconfigured."""
        off = set(off)
        for h in list(self._by_name.values()):
            if h.name in off or h.module in off:
                self._drop(h, "switched off")
            elif h.enabled is not None:
                try:
                    enabled = h.enabled(settings)
                except Exception as exc:
                    if not tolerant:
                        raise
                    self._drop(h, f"misconfigured: {type(exc).__name__}")
                    continue
                if not enabled:
                    self._drop(h, "not configured")

    def names(self) -> set[str]:
        """Every handler registered, running here or not."""
        return set(self._by_name) | set(self.inactive)

    def _drop(self, h: Handler, why: str) -> None:
        del self._by_name[h.name]
        for event_type in h.event_types:
            self._by_type[event_type].remove(h)
        self.inactive[h.name] = (h, why)

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
        enabled: Enabled | None = None,
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

        ``enabled`` decides, from the settings, whether it runs (e.g. only when its service is
        configured): a module registers its handlers unconditionally and reads no environment.
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
                    enabled,
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
        _import(module, "CALHOOK_HANDLER_MODULES")


@dataclass(frozen=True, slots=True)
class ModuleSource:
    """A handler module to load, and where it was named."""

    module: str
    origin: str  # "built in", "entry point NAME of DIST VERSION", "CALHOOK_HANDLER_MODULES"
    name: str = ""  # the built-in's or the entry point's name


def handler_sources(listed: Iterable[str]) -> tuple[list[ModuleSource], set[str]]:
    """The modules to load: built in, installed (entry points of ``calhook.handlers``), then
    ``listed`` (CALHOOK_HANDLER_MODULES), each once; and the names ``listed`` switches off."""
    sources = [ModuleSource(m, "built in", m.rsplit(".", 1)[-1]) for m in BUILTIN_MODULES]
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_key):
        dist = ep.dist
        about = f"{dist.name} {dist.version}" if dist is not None else "an installed package"
        sources.append(ModuleSource(ep.value.split(":")[0], f"entry point {ep.name} of {about}",
                                    ep.name))  # fmt: skip
    off: set[str] = set()
    for item in listed:
        if item.startswith("-"):
            off.add(item[1:])
        else:
            sources.append(ModuleSource(item, "CALHOOK_HANDLER_MODULES"))
    seen: set[str] = set()
    unique = []
    for source in sources:
        if source.module not in seen:
            seen.add(source.module)
            unique.append(source)
    return unique, off


def load_handlers(settings: Settings, *, tolerant: bool = False) -> Registry:
    """Load every handler the workers run (see the module docstring) into :data:`registry` and
    keep those that run with ``settings``; return it. ``tolerant`` (the read-only tools): a
    predicate that raises leaves its handler inactive ("misconfigured: …") instead of
    stopping."""
    sources, off = handler_sources(settings.handler_modules)
    # A source switched off by its name (-crm, -an_entry_point) is off by its module too.
    off |= {source.module for source in sources if source.name and source.name in off}
    for source in sources:
        if source.module not in off:
            _import(source.module, source.origin)
    registry.activate(settings, off, tolerant=tolerant)
    known = {s.module for s in sources} | {s.name for s in sources} | set(registry.names())
    for name in sorted(off - known):
        log.warning(
            "CALHOOK_HANDLER_MODULES switches off something that is not there",
            extra={"switched_off": name},
        )
    return registry


def _ep_key(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    return (ep.name, ep.value)


def _import(module: str, origin: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        # Whatever goes wrong (a missing dependency, a duplicate name, a bad signature), say
        # where the module came from, and how to do without it.
        raise HandlerModuleError(
            f"cannot import handler module {module!r} ({origin}): {type(exc).__name__}: {exc}"
            f" (CALHOOK_HANDLER_MODULES=-{module} switches it off)"
        ) from exc


# --- the event parameter ----------------------------------------------------------------------


def model_of(event_type: str) -> type[CalensoEvent]:
    """The model a handler receives for ``event_type`` (UnknownEvent for a type Calenso's
    catalogue does not know)."""
    family = family_of(event_type)
    return MODEL_BY_FAMILY[family] if family is not None else UnknownEvent


def check_signature(h: Handler) -> None:
    """Raise HandlerSignatureError if ``h``'s first parameter is annotated with a type that
    cannot take the model of one of its event types. An unannotated parameter, or one whose
    annotation cannot be resolved, is not checked."""
    try:
        signature = inspect.signature(h.fn)
    except (TypeError, ValueError):
        return  # a builtin or an extension's callable: not checked
    try:
        signature.bind(object(), object())
    except TypeError:
        raise HandlerSignatureError(
            f"handler {h.name!r} must take (event, ctx) as its two positional parameters; "
            f"it is {h.fn!r}{signature}"
        ) from None
    params = list(signature.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                            params[0].POSITIONAL_OR_KEYWORD):  # fmt: skip
        return
    target = h.fn.func if isinstance(h.fn, functools.partial) else h.fn
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = getattr(target, "__call__", target)  # noqa: B004
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):
        return
    accepted = _classes(hints.get(params[0].name))
    if accepted is None:
        return
    for event_type in sorted(h.event_types):
        model = model_of(event_type)
        try:
            fits = any(issubclass(model, a) for a in accepted)
        except TypeError:
            return  # a protocol or another class that cannot be checked
        if not fits:
            takes = " | ".join(a.__name__ for a in accepted)
            raise HandlerSignatureError(
                f"handler {h.name!r} takes {takes}, but {event_type!r} events come as "
                f"{model.__name__}: annotate its event {model.__name__} (or a union with it), "
                f"or register it for other types"
            )


def _classes(annotation: Any) -> tuple[type, ...] | None:
    """The classes an annotation accepts (a class, or a union of classes); None when it is
    something else (Any, a protocol, a string) that is not checked."""
    if annotation is None or annotation is Any:
        return None
    if typing.get_origin(annotation) is typing.Annotated:
        return _classes(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return (annotation,)
    origin = typing.get_origin(annotation)
    if isinstance(origin, type) and origin is not types.UnionType:
        return (origin,)  # dict[str, Any] takes dicts, not events
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if all(isinstance(m, type) for m in members):
            return tuple(m for m in members if m is not type(None))
    return None
