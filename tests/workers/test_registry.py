"""The handler registry: explicit, duplicate names fail, misses are domain errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from calhook.settings import Settings
from schemas import AppointmentEvent, CalensoEvent, CustomerEvent, GroupEventEvent, UnknownEvent
from tests.conftest import ROOT
from workers.errors import (
    DuplicateHandler,
    HandlerModuleError,
    HandlerSignatureError,
    UnknownHandler,
)
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


# The event parameter ---------------------------------------------------------------------------


def customer_only(event: CustomerEvent, ctx: HandlerContext) -> None:
    """Takes customer events."""


def bookings(event: AppointmentEvent | GroupEventEvent, ctx: HandlerContext) -> None:
    """Takes appointment and group-event bookings."""


def unknown(event: UnknownEvent, ctx: HandlerContext) -> None:
    """Takes a custom type."""


def untyped(event, ctx):  # type: ignore[no-untyped-def]
    """Annotated with nothing: not checked."""


def test_a_handler_whose_parameter_cannot_take_its_events_fails_at_registration() -> None:
    registry = Registry()
    with pytest.raises(HandlerSignatureError) as raised:
        registry.handler("customer.created", "appointment.booking.created", queue="q",
                         name="mixed")(customer_only)  # fmt: skip
    assert str(raised.value) == (
        "handler 'mixed' takes CustomerEvent, but 'appointment.booking.created' events come as "
        "AppointmentEvent: annotate its event AppointmentEvent (or a union with it), or register "
        "it for other types"
    )
    assert len(registry) == 0
    # What fits: the family's model, a union of families, the base class, a custom type as
    # UnknownEvent, no annotation.
    registry.handler("customer.created", "customer.deleted", queue="q", name="c")(customer_only)
    registry.handler("appointment.booking.created", "event.booking.created", queue="q",
                     name="b")(bookings)  # fmt: skip
    registry.handler("customer.created", "lead.created", queue="q", name="any")(noop)
    registry.handler("acme.invoice.paid", queue="q", name="u")(unknown)
    registry.handler("lead.created", queue="q", name="t")(untyped)
    assert len(registry) == 5
    with pytest.raises(HandlerSignatureError, match=r"'acme\.invoice\.paid' events come as Unk"):
        registry.handler("acme.invoice.paid", queue="q", name="cu")(customer_only)


def test_a_handler_must_take_the_event_and_its_context() -> None:
    def one(event: CalensoEvent) -> None: ...

    with pytest.raises(HandlerSignatureError, match=r"must take \(event, ctx\)"):
        Registry().handler("lead.created", queue="q", name="one")(one)  # type: ignore[arg-type]


# Which handlers run -------------------------------------------------------------------------


def test_enabled_predicates_and_switches_decide_what_runs(
    make_settings: Callable[..., Settings],
) -> None:
    registry = Registry()
    registry.handler("lead.created", queue="q", name="always")(noop)
    registry.handler("lead.created", queue="q", name="crm.x",
                     enabled=lambda s: bool(s.crm_kind))(noop)  # fmt: skip
    registry.handler("lead.created", queue="q", name="off.me")(noop)

    registry.activate(make_settings(), off={"off.me"})

    assert [h.name for h in registry.for_type("lead.created")] == ["always"]
    assert {n: why for n, (_, why) in registry.inactive.items()} == {
        "crm.x": "not configured",
        "off.me": "switched off",
    }
    with pytest.raises(DuplicateHandler):
        registry.handler("lead.created", queue="q", name="crm.x")(noop)


LOADED = """
import json, sys
from calhook.settings import load_settings
from workers.registry import load_handlers
registry = load_handlers(load_settings(**json.loads(sys.argv[1])))
print(json.dumps({"active": sorted(h.name for h in registry),
                  "inactive": {n: why for n, (_, why) in sorted(registry.inactive.items())}}))
"""


def loaded(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    """What a worker process loads with ``settings`` (a process of its own: the registry is
    the process's), with the distribution under ``tmp_path/site`` installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    env.pop("CALHOOK_HANDLER_MODULES", None)
    env.pop("BOOKINGS_DSN", None)
    values = json.dumps({"redis_url": "redis://127.0.0.1:1/0", **settings})
    run = subprocess.run(
        [sys.executable, "-c", LOADED, values],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def install_team_package(site: Path) -> None:
    """A distribution ``acme-handlers`` declaring the entry point ``acme`` (as pip leaves it)."""
    (site / "acme_handlers").mkdir(parents=True)
    (site / "acme_handlers" / "__init__.py").write_text(
        "from schemas import CustomerEvent\n"
        "from workers.registry import HandlerContext, handler\n\n\n"
        '@handler("customer.created", queue="acme", name="acme.welcome")\n'
        "def welcome(event: CustomerEvent, ctx: HandlerContext) -> None:\n"
        "    pass\n"
    )
    info = site / "acme_handlers-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-handlers\nVersion: 1.2.0\n")
    (info / "entry_points.txt").write_text("[calhook.handlers]\nacme = acme_handlers\n")


def test_built_in_installed_and_listed_handlers_are_loaded_and_can_be_switched_off(
    tmp_path: Path,
) -> None:
    install_team_package(tmp_path / "site")

    # Built in and installed, with nothing listed: the CRM and notify handlers wait for their
    # configuration, the team's handler is found through its entry point.
    plain = loaded(tmp_path)
    assert plain["active"] == ["acme.welcome", "audit"]
    # (and whatever else is installed here, the example package: not configured either)
    assert (
        plain["inactive"].items()
        >= {
            "crm.sync_booking_customer": "not configured",
            "crm.sync_customer": "not configured",
            "crm.sync_lead": "not configured",
            "notify.chat": "not configured",
            "notify.email": "not configured",
        }.items()
    )
    # A module listed adds to them (it replaced them before), and configuration switches on.
    listed = loaded(tmp_path, handler_modules="tests.support.recording", crm_kind="http",
                    crm_url="http://crm.example")  # fmt: skip
    assert {"acme.welcome", "audit", "crm.sync_customer", "record"} <= set(listed["active"])
    # Off by a handler's name (its module is loaded), a built-in's name, a module's: the last
    # two are not even imported.
    off = loaded(tmp_path, handler_modules="-acme.welcome,-crm,-workers.tasks.audit",
                 crm_kind="http", crm_url="http://crm.example")  # fmt: skip
    assert off["active"] == []
    assert (
        off["inactive"].items()
        >= {
            "acme.welcome": "switched off",
            "notify.chat": "not configured",
            "notify.email": "not configured",
        }.items()
    )
    assert not {"audit", "crm.sync_customer"} & set(off["inactive"])
    # And an entry point's name.
    assert "acme.welcome" not in loaded(tmp_path, handler_modules="-acme")["active"]


def test_an_entry_point_that_cannot_be_imported_names_its_distribution(tmp_path: Path) -> None:
    install_team_package(tmp_path / "site")
    (tmp_path / "site" / "acme_handlers" / "__init__.py").write_text("import no_such_module\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-c", LOADED, json.dumps({"redis_url": "redis://127.0.0.1:1/0"})],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode != 0
    assert (
        "cannot import handler module 'acme_handlers' (entry point acme of acme-handlers "
        "1.2.0): ModuleNotFoundError: No module named 'no_such_module'" in run.stderr
    )


def test_the_signature_check_knows_the_shapes_handlers_come_in() -> None:
    registry = Registry()

    def star(*args: Any) -> None: ...

    def with_client(event: CustomerEvent, ctx: HandlerContext, client: object = None) -> None: ...

    class Readable(Protocol):
        type: str

    def protocol(event: Readable, ctx: HandlerContext) -> None: ...

    # Accepted: *args, a defaulted third parameter, a protocol (not checkable), a partial.
    registry.handler("lead.created", queue="q", name="star")(star)
    registry.handler("customer.created", queue="q", name="client")(with_client)
    registry.handler("lead.created", queue="q", name="proto")(protocol)
    registry.handler("customer.created", queue="q", name="partial")(
        functools.partial(with_client, client=1)
    )

    def kwargs_only(event: CalensoEvent, **kw: Any) -> None: ...

    def three(event: CalensoEvent, ctx: HandlerContext, client: object) -> None: ...

    def a_dict(event: dict[str, Any], ctx: HandlerContext) -> None: ...

    # Refused: what the runner could not call as fn(event, ctx), and a wrong model.
    wrong: list[tuple[str, Any]] = [("kw", kwargs_only), ("three", three)]
    for name, fn in wrong:
        with pytest.raises(HandlerSignatureError, match="must take \\(event, ctx\\) as its two"):
            registry.handler("lead.created", queue="q", name=name)(fn)
    with pytest.raises(HandlerSignatureError, match="takes dict"):
        registry.handler("lead.created", queue="q", name="dict")(a_dict)
    with pytest.raises(HandlerSignatureError, match="takes CustomerEvent"):
        registry.handler("lead.created", queue="q", name="wrong_partial")(
            functools.partial(with_client, client=1)
        )


def test_a_predicate_that_raises_is_fatal_for_a_worker_and_tolerated_by_read_only_tools(
    make_settings: Callable[..., Settings],
) -> None:
    def broken(settings: Settings) -> bool:
        raise ValueError("BOOKINGS_DSN is not a URL")

    registry = Registry()
    registry.handler("lead.created", queue="q", name="broken", enabled=broken)(noop)
    with pytest.raises(ValueError, match="not a URL"):
        registry.activate(make_settings())
    registry.activate(make_settings(), tolerant=True)
    assert registry.inactive["broken"][1] == "misconfigured: ValueError"


def test_a_broken_installed_package_names_itself_and_the_way_out(tmp_path: Path) -> None:
    install_team_package(tmp_path / "site")
    (tmp_path / "site" / "acme_handlers" / "__init__.py").write_text(
        "from schemas import CalensoEvent\n"
        "from workers.registry import HandlerContext, handler\n\n\n"
        '@handler("lead.created", queue="acme", name="audit")\n'
        "def clash(event: CalensoEvent, ctx: HandlerContext) -> None:\n"
        "    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    env.pop("CALHOOK_HANDLER_MODULES", None)
    values = json.dumps({"redis_url": "redis://127.0.0.1:1/0"})
    run = subprocess.run(
        [sys.executable, "-c", LOADED, values],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode != 0
    assert (
        "cannot import handler module 'acme_handlers' (entry point acme of acme-handlers "
        "1.2.0): DuplicateHandler: a handler named 'audit' is already registered "
        "(CALHOOK_HANDLER_MODULES=-acme_handlers switches it off)"
    ) in run.stderr
    # And the way out works; a name that matches nothing is warned of.
    assert "audit" in loaded(tmp_path, handler_modules="-acme,-typo")["active"]
