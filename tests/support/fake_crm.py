"""A CRM bridge implementing calhook's ``http`` contract, recording calls, injecting faults."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.threaded import ThreadedServer

TOKEN = "crm-test-token"


@dataclass
class Call:
    method: str
    uuid: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    at: float
    status: int = 0


@dataclass
class Fault:
    """An answer to give instead of the normal one."""

    status: int
    body: str = ""
    retry_after: str | None = None
    delay_s: float = 0.0


@dataclass
class FakeCrm:
    """``PUT``/``DELETE /contacts/{uuid}`` with a Bearer token; contacts kept in memory.

    ``delay_s`` holds every answer back that long (a slow CRM); requests wait concurrently.
    """

    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    delay_s: float = 0.0
    # While set, every call is answered with this status (a CRM down for a long stretch).
    outage_status: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadedServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def start(self) -> FakeCrm:
        app = web.Application()
        app.add_routes(
            [web.put("/contacts/{uuid}", self._put), web.delete("/contacts/{uuid}", self._delete)]
        )
        self._server = ThreadedServer(app).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def reset(self) -> None:
        with self._lock:
            self.contacts.clear()
            self.calls.clear()
            self.faults.clear()
            self.delay_s = 0.0
            self.outage_status = None

    def fail_next(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def calls_for(self, uuid: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.uuid == uuid]

    async def _answer(
        self, request: web.Request, body: dict[str, Any] | None
    ) -> Call | web.Response:
        call = Call(
            request.method, request.match_info["uuid"], body, dict(request.headers), time.time()
        )
        with self._lock:
            self.calls.append(call)
            fault = self.faults.pop(0) if self.faults else None
            if fault is None and self.outage_status is not None:
                fault = Fault(self.outage_status, "down for maintenance")
            delay_s = self.delay_s
        await asyncio.sleep(delay_s)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            call.status = 401
            return web.json_response({"error": "bad token"}, status=401)
        if fault is not None:
            await asyncio.sleep(fault.delay_s)
            call.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, text=fault.body, headers=headers)
        return call

    async def _put(self, request: web.Request) -> web.Response:
        body = await request.json()
        answer = await self._answer(request, body)
        if isinstance(answer, web.Response):
            return answer
        with self._lock:
            self.contacts[answer.uuid] = body
        answer.status = 200
        return web.json_response({"ok": True})

    async def _delete(self, request: web.Request) -> web.Response:
        answer = await self._answer(request, None)
        if isinstance(answer, web.Response):
            return answer
        with self._lock:
            existed = self.contacts.pop(answer.uuid, None) is not None
        answer.status = 204 if existed else 404
        return web.Response(status=answer.status)
