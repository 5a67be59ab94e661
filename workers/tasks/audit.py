"""The audit handler: one structured log line per event, personal data masked.

It makes the whole path observable (ingress → dispatch → handler) and gives ops a trail they
can grep by event_id or customer uuid without reading anyone's name or e-mail address.
"""

from __future__ import annotations

import logging
from typing import Any

from calhook.constants import AUDIT_QUEUE
from calhook.privacy import mask_email, mask_name, mask_phone
from schemas import (
    CURRENT_TYPES,
    AppointmentEvent,
    CalensoEvent,
    GroupEventEvent,
    LeadEvent,
    PaymentEvent,
)
from workers.registry import HandlerContext, handler

log = logging.getLogger("calhook.audit")


def audit_fields(event: CalensoEvent) -> dict[str, Any]:
    """The masked summary of ``event`` that the audit line carries."""
    fields: dict[str, Any] = {
        "family": str(event.family) if event.family else None,
        "shape": event.shape,
        "event_created": event.created.isoformat(),
    }
    person: Any = event.customer
    if isinstance(event, LeadEvent):
        person = event.lead
        fields["lead_uuid"] = event.lead.uuid
    if person is not None:
        fields["customer_uuid"] = getattr(person, "uuid", None)
        fields["email"] = mask_email(person.email)
        fields["phone"] = mask_phone(person.phone)
        fields["initials"] = " ".join(
            n for n in (mask_name(person.first_name), mask_name(person.last_name)) if n
        )
    if isinstance(event, AppointmentEvent | PaymentEvent) and event.appointment is not None:
        fields["appointment_uuid"] = event.appointment.uuid
        fields["starts_at"] = _iso(event.appointment.start_utc)
    if isinstance(event, GroupEventEvent | PaymentEvent) and event.event is not None:
        fields["group_event_uuid"] = event.event.uuid
        if event.slot is not None:
            fields["starts_at"] = _iso(event.slot.start_utc)
    if isinstance(event, PaymentEvent):
        fields["payment_status"] = event.payment.status
    return fields


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@handler(*sorted(CURRENT_TYPES), queue=AUDIT_QUEUE, name="audit")
def audit(event: CalensoEvent, ctx: HandlerContext) -> None:
    """Write the audit line of ``event``."""
    log.info("audit", extra=audit_fields(event))
