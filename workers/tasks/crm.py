"""CRM sync (queue ``crm``): customers, the customers of bookings, and leads.

- ``customer.created`` / ``customer.updated`` → upsert the contact; ``customer.deleted`` →
  delete it. Ordered per customer: a late, older event never overwrites newer state.
- Bookings (``appointment.*``, ``event.*``) → upsert the customer they carry, since many
  partners subscribe to booking events only (``CALHOOK_CRM_SYNC_BOOKINGS``). Same order scope
  as the customer events, counted as updates: a booking's snapshot never undoes a newer
  ``customer.updated`` nor brings a deleted customer back.
- ``lead.created`` → a contact marked as a lead.

The handlers are ``async def``: they run on the worker process's event loop, the events of a
batch calling the CRM concurrently (aiohttp), each call after a token of the shared rate limit.
Registered only when ``CALHOOK_CRM_KIND`` is set.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

from calhook.settings import Settings, get_settings
from schemas import CalensoEvent, CustomerEvent, LeadEvent
from workers.connections import async_redis_client
from workers.crm.client import CrmClient
from workers.crm.contact import Contact, contact_from_customer, contact_from_lead
from workers.crm.http import HttpCrm
from workers.crm.ratelimit import AsyncRateLimiter, RateLimitedCrm
from workers.errors import PermanentError
from workers.ordering import booking_customer_version
from workers.registry import HandlerContext, Registry, RetryPolicy, registry

log = logging.getLogger("calhook.crm")
T = TypeVar("T")

CRM_QUEUE = "crm"
ORDER_SCOPE = "crm"
# The CRM handlers call one service: its outage opens one breaker that holds them all.
CIRCUIT = "crm"
# The CRM client retries a call quickly itself (workers/crm/client.py), Retry-After aware: the
# runner's own quick retries on top would make each failed attempt nine calls, not three.
RETRY = RetryPolicy(quick_retries=0)
BOOKING_TYPES = (
    "appointment.booking.created",
    "appointment.manual.booking.created",
    "appointment.updated",
    "appointment.booking.cancelled",
    "event.booking.created",
    "event.manual.booking.created",
    "event.booking.cancelled",
)


@functools.cache
def crm() -> CrmClient:
    """This process's CRM client, from the settings, behind the shared rate limit.

    Made once per process, and bound to no event loop: its HTTP sessions and Redis clients are
    made per loop, on first use in it.
    """
    settings = get_settings()
    token = settings.crm_token.get_secret_value()
    client: CrmClient
    if settings.crm_kind == "hubspot":
        from workers.crm.hubspot import HubSpotCrm

        client = HubSpotCrm(
            token,
            base_url=settings.crm_url or "https://api.hubapi.com",
            id_property=settings.hubspot_id_property,
            timeout_s=settings.crm_timeout_s,
        )
    else:
        client = HttpCrm(settings.crm_url, token, timeout_s=settings.crm_timeout_s)
    if settings.crm_rate_per_s > 0:
        limiter = AsyncRateLimiter(
            async_redis_client, f"crm:{settings.crm_kind}", settings.crm_rate_per_s
        )
        client = RateLimitedCrm(client, limiter)
    return client


def _contact(make: Callable[[T], Contact], source: T) -> Contact:
    try:
        return make(source)
    except ValueError as exc:  # no uuid: no retry will give it one
        raise PermanentError(str(exc)) from exc


# Each handler takes the CRM as an optional third argument: the worker calls it with two, so it
# uses the process's (:func:`crm`); tests pass a client of their own.


async def sync_customer(
    event: CustomerEvent, ctx: HandlerContext, client: CrmClient | None = None
) -> None:
    """Upsert or delete the customer's contact."""
    client = client or crm()
    if event.type == "customer.deleted":
        await client.delete(event.customer.uuid or "", idempotency_key=ctx.idempotency_key)
        log.info("contact deleted", extra={"customer_uuid": event.customer.uuid})
        return
    contact = _contact(contact_from_customer, event.customer)
    await client.upsert(contact, idempotency_key=ctx.idempotency_key)
    log.info("contact upserted", extra={"customer_uuid": contact.calenso_uuid})


async def sync_booking_customer(
    event: CalensoEvent, ctx: HandlerContext, client: CrmClient | None = None
) -> None:
    """Upsert the customer a booking carries (a booking without one is left alone)."""
    if event.customer is None or not event.customer.uuid:
        log.info("booking carries no customer")
        return
    contact = _contact(contact_from_customer, event.customer)
    await (client or crm()).upsert(contact, idempotency_key=ctx.idempotency_key)
    log.info("contact upserted", extra={"customer_uuid": contact.calenso_uuid})


async def sync_lead(event: LeadEvent, ctx: HandlerContext, client: CrmClient | None = None) -> None:
    """Upsert the lead as a contact marked as a lead."""
    contact = _contact(contact_from_lead, event.lead)
    await (client or crm()).upsert(contact, idempotency_key=ctx.idempotency_key)
    log.info("lead upserted", extra={"lead_uuid": contact.calenso_uuid})


def crm_configured(settings: Settings) -> bool:
    """The CRM handlers run when CALHOOK_CRM_KIND names a CRM."""
    return bool(settings.crm_kind)


def bookings_synced(settings: Settings) -> bool:
    """The booking handler runs with the CRM, unless CALHOOK_CRM_SYNC_BOOKINGS is off."""
    return bool(settings.crm_kind) and settings.crm_sync_bookings


def declare(target: Registry) -> None:
    """Register the CRM handlers with ``target``; they run where their predicate holds."""
    target.handler(
        "customer.created",
        "customer.updated",
        "customer.deleted",
        queue=CRM_QUEUE,
        name="crm.sync_customer",
        ordered=True,
        order_scope=ORDER_SCOPE,
        circuit=CIRCUIT,
        retry=RETRY,
        enabled=crm_configured,
    )(sync_customer)
    target.handler(
        *BOOKING_TYPES,
        queue=CRM_QUEUE,
        name="crm.sync_booking_customer",
        order_key=booking_customer_version,
        order_scope=ORDER_SCOPE,
        circuit=CIRCUIT,
        retry=RETRY,
        enabled=bookings_synced,
    )(sync_booking_customer)
    target.handler(
        "lead.created",
        queue=CRM_QUEUE,
        name="crm.sync_lead",
        circuit=CIRCUIT,
        retry=RETRY,
        enabled=crm_configured,
    )(sync_lead)


declare(registry)
