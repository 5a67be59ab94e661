"""The ``http`` CRM kind: a plain JSON contract any CRM bridge can implement.

- ``PUT {CALHOOK_CRM_URL}/contacts/{calenso_uuid}`` with the contact as JSON
  (:meth:`~workers.crm.contact.Contact.as_json`): create or replace.
- ``DELETE {CALHOOK_CRM_URL}/contacts/{calenso_uuid}``: delete; ``404`` counts as done.
- Both carry ``Authorization: Bearer {CALHOOK_CRM_TOKEN}`` and ``Idempotency-Key``, stable
  across retries of the same (event, handler).
- ``2xx`` is success; ``429`` and ``5xx`` are retried (``Retry-After`` honoured); any other
  ``4xx`` is permanent: the pair goes to the dead-letter store with the bridge's answer.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from workers.crm.client import call, check
from workers.crm.contact import Contact


class HttpCrm:
    """A CRM bridge speaking the http contract."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._http = http or httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "calhook"},
        )

    def upsert(self, contact: Contact, *, idempotency_key: str) -> None:
        """PUT the contact."""
        path = f"/contacts/{quote(contact.calenso_uuid, safe='')}"
        call(
            lambda: check(
                self._http.put(
                    path, json=contact.as_json(), headers={"Idempotency-Key": idempotency_key}
                )
            )
        )

    def delete(self, calenso_uuid: str, *, idempotency_key: str) -> None:
        """DELETE the contact; one that is already gone is fine."""
        path = f"/contacts/{quote(calenso_uuid, safe='')}"
        call(
            lambda: check(
                self._http.delete(path, headers={"Idempotency-Key": idempotency_key}),
                ok_statuses=(404,),
            )
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()
