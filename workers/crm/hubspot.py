"""The ``hubspot`` CRM kind: Calenso contacts kept in HubSpot through the CRM v3 contacts API.

What the HubSpot documentation confirms (and this module relies on):

- Auth: ``Authorization: Bearer <private app token>`` on every call.
  https://developers.hubspot.com/docs/api-reference/legacy/crm/objects/contacts/batch/upsert-contacts
- Upsert: ``POST /crm/v3/objects/contacts/batch/upsert`` with
  ``{"inputs": [{"id": <value>, "idProperty": <property>, "properties": {...}}]}``; the answer
  has ``results`` (``id``, ``new``, ``properties`` …) and, on partial failure (207), ``errors``
  and ``numErrors``. ``idProperty`` names "a property whose values are unique for the object".
  (same URL; and …/latest/crm/objects/custom-objects/batch/upsert-custom-objects)
- Read one: ``GET /crm/v3/objects/contacts/{contactId}``, or by e-mail
  ``/crm/v3/objects/contacts/{email}?idProperty=email``; the guide's section "Retrieve contacts
  by record ID, email, or custom unique value property" extends this to a custom unique property.
  https://developers.hubspot.com/docs/api-reference/crm-contacts-v3/guide
- Archive: ``DELETE /crm/v3/objects/contacts/{contactId}`` (no body in the answer; restorable for
  90 days); ``POST /crm/v3/objects/contacts/batch/archive`` takes ``{"inputs": [{"id": …}]}``.
  https://developers.hubspot.com/docs/api-reference/legacy/crm/objects/contacts/delete-contact
- Properties: ``email``, ``firstname``, ``lastname`` are the primary ones; ``lifecyclestage``
  takes internal names, and ``lead`` and ``customer`` are default stages (guide above).
  ``phone``, ``address``, ``city``, ``zip``, ``country`` are listed as recommended properties.
- Rate limits: a 429 whose body names the policy (``"errorType": "RATE_LIMIT"``,
  ``"policyName": "DAILY"`` or secondly); burst limits are counted per 10 seconds (e.g. 100 or
  190 requests / 10 s); headers ``X-HubSpot-RateLimit-Daily``, ``-Daily-Remaining``,
  ``-Secondly``, ``-Secondly-Remaining`` (no Daily ones for OAuth calls).
  https://developers.hubspot.com/changelog/2018-11-06-rate-limit-information-headers-will-be-included-in-http-responses
  https://developers.hubspot.com/changelog/increasing-our-api-limits
  https://developers.hubspot.com/docs/api/usage-details (429 body, as quoted by HubSpot's forum)
- Errors: JSON with ``status``, ``message``, ``correlationId``, ``category`` and optionally
  ``errors``; every field is optional. https://developers.hubspot.com/docs/api-reference/error-handling

What could not be confirmed, and the conservative choice made:

- ``DELETE …/{value}?idProperty=…`` is not documented: delete reads the contact by its unique
  property first, then archives it by its record id. A 404 on either call means it is gone.
- ``Retry-After`` on HubSpot's 429s, and ``X-HubSpot-RateLimit-Max``, ``-Remaining``,
  ``-Interval-Milliseconds`` appear only in third-party material: they are honoured when
  present (a 429 without ``Retry-After`` waits out the whole interval, or one second when the
  secondly budget is spent), else the default backoff applies.
- ``salutation``, ``hs_language``, ``date_of_birth``, ``company`` are HubSpot default property
  names we could not see in the documentation; values are sent as plain strings (ISO date).
- No idempotency header is documented: an upsert by unique property and an archive are
  idempotent by themselves, so ``idempotency_key`` is not sent.
- With ``id_property="email"`` a contact is found by its e-mail only: a delete whose key is a
  Calenso uuid (not an e-mail) cannot be resolved and is refused as permanent.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from calhook.privacy import mask_email
from workers.crm.client import CrmUnavailable, call, check
from workers.crm.contact import Contact
from workers.errors import PermanentError
from workers.http import Answer, read_answer, sessions

log = logging.getLogger("calhook.crm")

CONTACTS_PATH = "/crm/v3/objects/contacts"
_SALUTATIONS = {"mr": "Mr", "ms": "Ms"}
_LIFECYCLE_STAGES = {"lead": "lead", "customer": "customer"}
_REDACTED = "[redacted]"


def hubspot_properties(contact: Contact, id_property: str) -> dict[str, str]:
    """The contact as HubSpot contact properties; fields Calenso left empty are left out.

    A None is never sent as an empty string: that would blank what HubSpot already has.
    """
    values: dict[str, str | None] = {
        "firstname": contact.first_name,
        "lastname": contact.last_name,
        "email": contact.email,
        "phone": contact.phone,
        "salutation": _SALUTATIONS.get(contact.salutation or ""),
        "hs_language": contact.language,
        "address": contact.street,
        "zip": contact.zip,
        "city": contact.city,
        "country": contact.country,
        "company": contact.company,
        "date_of_birth": contact.birthday.isoformat() if contact.birthday else None,
        "lifecyclestage": _LIFECYCLE_STAGES.get(contact.lifecycle),
    }
    if id_property != "email":
        values[id_property] = contact.calenso_uuid
    return {name: value for name, value in values.items() if value is not None}


def rate_limit_wait_s(headers: Mapping[str, str]) -> float | None:
    """How long HubSpot's rate-limit headers say to wait, for a 429 without ``Retry-After``."""
    interval_ms = _number(headers.get("X-HubSpot-RateLimit-Interval-Milliseconds"))
    remaining = _number(headers.get("X-HubSpot-RateLimit-Remaining"))
    # The window slides: waiting one whole interval is the longest it can take to free a slot.
    if interval_ms is not None and interval_ms > 0 and (remaining is None or remaining <= 0):
        return interval_ms / 1000
    secondly_remaining = _number(headers.get("X-HubSpot-RateLimit-Secondly-Remaining"))
    if secondly_remaining is not None and secondly_remaining <= 0:
        return 1.0
    return None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _log_key(calenso_uuid: str) -> str:
    # A lead without uuid is keyed by its e-mail: never log that in the clear.
    return (mask_email(calenso_uuid) or "") if "@" in calenso_uuid else calenso_uuid


class HubSpotCrm:
    """HubSpot contacts, identified by a unique contact property (``calenso_uuid`` or ``email``),
    over aiohttp (a session per event loop)."""

    def __init__(
        self,
        token: str,
        *,
        base_url: str = "https://api.hubapi.com",
        id_property: str = "calenso_uuid",
        timeout_s: float = 10.0,
    ) -> None:
        self._token = token
        self._base_url = base_url.rstrip("/")
        self._id_property = id_property
        self._sessions = sessions(timeout_s)

    async def upsert(self, contact: Contact, *, idempotency_key: str) -> None:
        """Create or update the contact through HubSpot's batch upsert, with one input."""
        if self._id_property == "email":
            if not contact.email:
                raise PermanentError(
                    "HubSpot contacts are keyed by e-mail (id_property=email) and this contact "
                    "has no e-mail, so it cannot be upserted"
                )
            id_value = contact.email
        else:
            id_value = contact.calenso_uuid
        body = {
            "inputs": [
                {
                    "id": id_value,
                    "idProperty": self._id_property,
                    "properties": hubspot_properties(contact, self._id_property),
                }
            ]
        }
        response = await call(
            lambda: self._send("POST", f"{CONTACTS_PATH}/batch/upsert", json=body)
        )
        self._raise_batch_errors(response)
        log.debug(
            "hubspot upsert",
            extra={"customer_uuid": _log_key(contact.calenso_uuid), "status": response.status_code},
        )

    async def delete(self, calenso_uuid: str, *, idempotency_key: str) -> None:
        """Archive the contact; one HubSpot does not have (any more) is success."""
        if self._id_property == "email" and "@" not in calenso_uuid:
            raise PermanentError(
                "HubSpot contacts are keyed by e-mail (id_property=email): a contact cannot be "
                "found by its Calenso uuid, so it was not archived"
            )
        found = await call(
            lambda: self._send(
                "GET",
                f"{CONTACTS_PATH}/{quote(calenso_uuid, safe='')}",
                params={"idProperty": self._id_property},
                ok_statuses=(404,),
            )
        )
        if found.status_code == 404:
            log.debug(
                "hubspot contact already gone", extra={"customer_uuid": _log_key(calenso_uuid)}
            )
            return
        record_id = self._record_id(found)
        archived = await call(
            lambda: self._send(
                "DELETE", f"{CONTACTS_PATH}/{quote(record_id, safe='')}", ok_statuses=(404,)
            )
        )
        log.debug(
            "hubspot archive",
            extra={"customer_uuid": _log_key(calenso_uuid), "status": archived.status_code},
        )

    async def close(self) -> None:
        """Close the running event loop's connections (they close with the loop anyway)."""
        await self._sessions.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> Answer:
        session = await self._sessions.get()
        async with session.request(
            method,
            f"{self._base_url}{path}",
            params=params,
            json=json,
            headers={"Authorization": f"Bearer {self._token}"},
            allow_redirects=False,
        ) as raw:
            response = self._scrubbed(await read_answer(raw))
        if response.status_code == 429 and "Retry-After" not in response.headers:
            wait_s = rate_limit_wait_s(response.headers)
            if wait_s is not None:
                raise CrmUnavailable(f"CRM answered 429: {response.text[:500]}", wait_s)
        return check(response, ok_statuses=ok_statuses)

    def _scrubbed(self, response: Answer) -> Answer:
        """``response``, with the token cut out of an error answer that echoes it.

        Error texts end up in exceptions, the dead-letter store and logs; a proxy or gateway
        that echoes the request must not carry the token there.
        """
        if response.is_success or not self._token or self._token not in response.text:
            return response
        return dataclasses.replace(response, text=self._redact(response.text))

    def _redact(self, text: str) -> str:
        return text.replace(self._token, _REDACTED) if self._token else text

    @staticmethod
    def _record_id(response: Answer) -> str:
        try:
            record_id = response.json().get("id")
        except (ValueError, AttributeError):
            record_id = None
        if not isinstance(record_id, str | int) or record_id == "":
            raise PermanentError(f"HubSpot answered {response.status_code} without a contact id")
        return str(record_id)

    def _raise_batch_errors(self, response: Answer) -> None:
        """A batch answers 207 (or lists errors) when an input failed: ours is the only one."""
        try:
            body = response.json()
        except ValueError:
            body = None
        errors = body.get("errors") if isinstance(body, dict) else None
        if response.status_code != 207 and not errors:
            return
        messages = [str(e.get("message", e)) for e in errors or [] if isinstance(e, dict)]
        detail = self._redact("; ".join(messages) or response.text)[:500]
        raise PermanentError(f"HubSpot rejected the contact ({response.status_code}): {detail}")
