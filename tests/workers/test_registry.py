"""The handler registry: explicit, duplicate names fail, misses are domain errors."""

from __future__ import annotations

import pytest

from schemas import CalensoEvent
from workers.errors import DuplicateHandler, HandlerModuleError, UnknownHandler
from workers.registry import Handler, HandlerContext, Registry, load_modules


def noop(event: CalensoEvent, ctx: HandlerContext) -> None:
    """Do nothing."""


def test_handlers_are_found_by_type_in_registration_order() -> None:
    registry = Registry()
    registry.handler("customer.created", "customer.updated", queue="crm", name="crm.sync")(noop)
    registry.handler("customer.created", queue="notify", name="notify.welcome")(noop)

    assert [h.name for h in registry.for_type("customer.created")] == ["crm.sync", "notify.welcome"]
    assert [h.name for h in registry.for_type("customer.updated")] == ["crm.sync"]
    assert registry.for_type("lead.created") == ()
    assert registry.get("crm.sync").queue == "crm"
    assert registry.queues() == {"crm", "notify"}


def test_a_name_registers_once() -> None:
    registry = Registry()
    registry.handler("customer.created", queue="crm", name="sync")(noop)

    with pytest.raises(DuplicateHandler, match="'sync' is already registered"):
        registry.handler("customer.updated", queue="other", name="sync")(noop)
    assert len(registry) == 1


def test_a_miss_is_a_domain_error() -> None:
    with pytest.raises(UnknownHandler, match="no handler named 'ghost'"):
        Registry().get("ghost")


@pytest.mark.parametrize(
    "bad",
    [
        Handler("has space", frozenset({"customer.created"}), "crm", noop),
        Handler("ok", frozenset({"customer.created"}), "bad queue!", noop),
        Handler("ok", frozenset(), "crm", noop),
    ],
)
def test_names_queues_and_types_are_checked(bad: Handler) -> None:
    with pytest.raises(ValueError, match="handler"):
        Registry().register(bad)


def test_idempotency_key_is_stable_per_event_and_handler() -> None:
    ctx = HandlerContext("01a2-event", "crm.sync", "default", 0.0, attempt=3)

    assert ctx.idempotency_key == "01a2-event:crm.sync"


def test_an_unimportable_module_names_itself() -> None:
    with pytest.raises(
        HandlerModuleError, match=r"'workers\.tasks\.nope'.*CALHOOK_HANDLER_MODULES"
    ):
        load_modules(["workers.tasks.nope"])


async def remote_call(event: CalensoEvent, ctx: HandlerContext) -> None:
    """An async handler."""


def test_an_async_handler_is_told_apart_and_takes_a_concurrency_cap() -> None:
    registry = Registry()
    registry.handler("customer.created", queue="crm", name="a", concurrency=8)(remote_call)
    registry.handler("customer.created", queue="crm", name="s")(noop)
    assert registry.get("a").is_async
    assert registry.get("a").concurrency == 8
    assert not registry.get("s").is_async
    with pytest.raises(ValueError, match="concurrency"):
        registry.handler("customer.created", queue="crm", name="b", concurrency=0)(remote_call)
