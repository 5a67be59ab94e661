"""A Calenso customer or lead as a CRM contact: every field mapping in one place.

The ``http`` adapter sends :meth:`Contact.as_json` as it is; the HubSpot adapter maps the same
fields to HubSpot property names. Nothing else translates Calenso's names.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import phonenumbers

from schemas import Customer, Lead

# Calenso's salutation codes; anything else is left out rather than guessed.
_SALUTATIONS = {"m": "mr", "f": "ms", "w": "ms", "mr": "mr", "ms": "ms", "mrs": "ms"}
_DEFAULT_REGION = "CH"


@dataclass(frozen=True, slots=True)
class Contact:
    """What a CRM keeps of a Calenso customer or lead."""

    calenso_uuid: str
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    phone: str | None = None
    salutation: str | None = None
    language: str | None = None
    company: str | None = None
    street: str | None = None
    zip: str | None = None
    city: str | None = None
    country: str | None = None
    birthday: dt.date | None = None
    lifecycle: str = "customer"

    def as_json(self) -> dict[str, Any]:
        """The body of ``PUT /contacts/{calenso_uuid}`` in the http contract."""
        body = asdict(self)
        body["birthday"] = self.birthday.isoformat() if self.birthday else None
        body["source"] = "calenso"
        return body


def e164(phone: str | None, country: str | None) -> str | None:
    """``phone`` in E.164 (``+41791234567``), read in ``country`` when it has no prefix.

    Calenso usually sends E.164 already; a number that cannot be read is dropped, not sent
    half-right.
    """
    if not phone or not phone.strip():
        return None
    try:
        parsed = phonenumbers.parse(phone, (country or _DEFAULT_REGION).upper())
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _salutation(value: str | None) -> str | None:
    return _SALUTATIONS.get((value or "").strip().lower())


def _language(value: str | None) -> str | None:
    value = _clean(value)
    return value[:2].lower() if value else None


def _email(value: str | None) -> str | None:
    value = _clean(value)
    return value.lower() if value else None


def contact_from_customer(customer: Customer) -> Contact:
    """The contact of a Calenso customer; raises ValueError without a uuid."""
    if not customer.uuid:
        raise ValueError("a Calenso customer without uuid cannot be a CRM contact")
    country = _clean(customer.country)
    return Contact(
        calenso_uuid=customer.uuid,
        email=_email(customer.email),
        first_name=_clean(customer.first_name),
        last_name=_clean(customer.last_name),
        phone=e164(customer.phone, country),
        salutation=_salutation(customer.salutation),
        language=_language(customer.language),
        company=_clean(customer.company),
        street=_clean(customer.street),
        zip=_clean(customer.zip),
        city=_clean(customer.city),
        country=country.upper() if country else None,
        birthday=customer.birthday,
    )


def contact_from_lead(lead: Lead) -> Contact:
    """The contact of a Calenso lead, marked as a lead; keyed by its uuid (else its e-mail)."""
    key = lead.uuid or _email(lead.email)
    if not key:
        raise ValueError("a Calenso lead without uuid or e-mail cannot be a CRM contact")
    return Contact(
        calenso_uuid=key,
        email=_email(lead.email),
        first_name=_clean(lead.first_name),
        last_name=_clean(lead.last_name),
        phone=e164(lead.phone, None),
        salutation=_salutation(lead.salutation),
        company=_clean(lead.company),
        lifecycle="lead",
    )
