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

from workers.crm.client import call, check
from workers.crm.contact import Contact
from workers.http import Answer, read_answer, sessions


class HttpCrm:
    """A CRM bridge speaking the http contract, over aiohttp (a session per event loop)."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._sessions = sessions(timeout_s, {"Authorization": f"Bearer {token}"})

    async def upsert(self, contact: Contact, *, idempotency_key: str) -> None:
        """PUT the contact."""
        path = f"/contacts/{quote(contact.calenso_uuid, safe='')}"
        body = contact.as_json()
        await call(lambda: self._send("PUT", path, idempotency_key, json=body))

    async def delete(self, calenso_uuid: str, *, idempotency_key: str) -> None:
        """DELETE the contact; one that is already gone is fine."""
        path = f"/contacts/{quote(calenso_uuid, safe='')}"
        await call(lambda: self._send("DELETE", path, idempotency_key, ok_statuses=(404,)))

    async def close(self) -> None:
        """Close the running event loop's connections (they close with the loop anyway)."""
        await self._sessions.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        idempotency_key: str,
        *,
        json: object = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> Answer:
        session = await self._sessions.get()
        async with session.request(
            method,
            f"{self._base_url}{path}",
            json=json,
            headers={"Idempotency-Key": idempotency_key},
            allow_redirects=False,
        ) as response:
            answer = await read_answer(response)
        return check(answer, ok_statuses=ok_statuses)
