"""The pieces an event is made of: customer, staff, resource, store, services, slots, payment.

Every field is optional here (Calenso leaves many of them ``null`` and adds or drops fields over
time); which identifiers an event *needs* is decided per family in :mod:`schemas.events`. Field
names are ours (``first_name``); :func:`schemas._flat.keys` lists Calenso's names (``prename``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict

from schemas._flat import keys
from schemas._lenient import (
    OptBool,
    OptDate,
    OptDecimal,
    OptInt,
    OptLocalDatetime,
    OptStr,
    OptUtcDatetime,
)

_FIRST_NAME = keys("prename", "first_name", "firstname")
_LAST_NAME = keys("lastname", "last_name")


class Part(BaseModel):
    """Base of every part: immutable, and unknown fields are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Customer(Part):
    """A Calenso customer: the person who booked, or the subject of a ``customer.*`` event."""

    id: OptInt = None
    uuid: OptStr = None
    salutation: OptStr = None
    first_name: Annotated[OptStr, _FIRST_NAME] = None
    last_name: Annotated[OptStr, _LAST_NAME] = None
    email: OptStr = None
    phone: OptStr = None
    language: OptStr = None
    company: OptStr = None
    street: OptStr = None
    zip: OptStr = None
    city: Annotated[OptStr, keys("city", "place")] = None
    country: OptStr = None
    birthday: OptDate = None
    customer_type_id: OptInt = None
    remarks: OptStr = None


class Staff(Part):
    """A Calenso user account (``data.user``): the staff member the booking belongs to."""

    id: OptInt = None
    uuid: OptStr = None
    first_name: Annotated[OptStr, _FIRST_NAME] = None
    last_name: Annotated[OptStr, _LAST_NAME] = None
    email: OptStr = None
    job_title: OptStr = None
    bookable: OptBool = None
    avatar: OptStr = None
    conference_url: OptStr = None
    language: Annotated[OptStr, keys("lang_identifier", "language")] = None
    calendar_color: OptStr = None
    is_multi_language: OptBool = None
    is_lead_generator: OptBool = None
    is_reseller_admin: OptBool = None


class Worker(Part):
    """The booked resource (``data.worker``): a person or a room, as Calenso calls it."""

    id: OptInt = None
    uuid: OptStr = None
    full_name: Annotated[OptStr, keys("full_name", "resource_name")] = None
    first_name: Annotated[OptStr, _FIRST_NAME] = None
    last_name: Annotated[OptStr, _LAST_NAME] = None
    email: OptStr = None


class Store(Part):
    """The location (``data.store``) where the appointment takes place."""

    id: OptInt = None
    name: OptStr = None
    street: OptStr = None
    zip: OptStr = None
    city: Annotated[OptStr, keys("place", "city")] = None


class Service(Part):
    """One booked service (``data.appointment_services[]``)."""

    id: OptInt = None
    name: OptStr = None
    duration_min: Annotated[OptInt, keys("duration", "duration_min")] = None
    price: OptDecimal = None


class Appointment(Part):
    """A one-to-one appointment (``data.appointment``).

    ``start_local``/``end_local`` are the store's wall-clock time without a zone, as Calenso sends
    ``start``/``end``; ``start_utc``/``end_utc`` are the same instants, aware, in UTC.
    """

    id: OptInt = None
    uuid: OptStr = None
    title: OptStr = None
    description: OptStr = None
    remarks: OptStr = None
    start_local: Annotated[OptLocalDatetime, keys("start", "start_local")] = None
    end_local: Annotated[OptLocalDatetime, keys("end", "end_local")] = None
    start_utc: OptUtcDatetime = None
    end_utc: OptUtcDatetime = None
    url: OptStr = None
    parent_id: OptInt = None
    booking_link_id: OptInt = None
    worker_id: OptInt = None
    store_id: OptInt = None
    cancellation_reason: OptStr = None


class GroupEvent(Part):
    """A group appointment offer (``data.event``), e.g. a course; its dates are slots."""

    id: OptInt = None
    uuid: OptStr = None
    title: OptStr = None
    category: OptStr = None
    description: OptStr = None
    location: OptStr = None


class EventSlot(Part):
    """One date of a group event (``data.event_slot``); this is what a participant books."""

    id: OptInt = None
    event_id: OptInt = None
    start_local: Annotated[OptLocalDatetime, keys("start", "start_local")] = None
    end_local: Annotated[OptLocalDatetime, keys("end", "end_local")] = None
    start_utc: OptUtcDatetime = None
    end_utc: OptUtcDatetime = None
    max_participants: OptInt = None
    participant_count: OptInt = None


class Lead(Part):
    """A lead from a lead-generation form (``data.lead``, Enterprise plans only)."""

    id: OptInt = None
    uuid: OptStr = None
    salutation: OptStr = None
    first_name: Annotated[OptStr, _FIRST_NAME] = None
    last_name: Annotated[OptStr, _LAST_NAME] = None
    email: OptStr = None
    phone: OptStr = None
    company: OptStr = None
    remarks: OptStr = None
    source: OptStr = None


class Payment(Part):
    """A payment for a booking (``data.payment``); hypothetical until Calenso sends one."""

    status: OptStr = None
    amount: OptDecimal = None
    currency: OptStr = None
    provider: OptStr = None
    transaction_id: OptStr = None
