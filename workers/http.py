"""What handlers that call HTTP services share: an aiohttp session per event loop, answers read
whole, and ``Retry-After``."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from workers.looplocal import LoopLocal


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer, read whole: the status, the headers (case-insensitive) and the body."""

    status_code: int
    headers: Mapping[str, str]
    text: str

    @property
    def is_success(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body as JSON; raises ValueError if it is not."""
        return json.loads(self.text)


async def read_answer(response: aiohttp.ClientResponse) -> Answer:
    """Read ``response`` whole into an :class:`Answer` (its connection goes back to the pool)."""
    body = await response.read()
    try:
        text = body.decode(response.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    return Answer(response.status, response.headers, text)


def sessions(
    timeout_s: float, headers: Mapping[str, str] | None = None
) -> LoopLocal[aiohttp.ClientSession]:
    """HTTP sessions, one per event loop (made on first use in it, closed when it shuts down):
    a deadline of ``timeout_s`` per call, ``headers`` on every request.

    Pass ``allow_redirects=False`` to each request: a redirect is an answer, not followed.
    """

    def make() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers={"User-Agent": "calhook", **(headers or {})},
            # Every call stands alone: no cookie of one event's answer rides along with another.
            cookie_jar=aiohttp.DummyCookieJar(),
            # HTTP(S)_PROXY and NO_PROXY apply, as they did with httpx: many companies reach
            # outside APIs only through a proxy. (aiohttp looks them up per request in a
            # thread, a cost a remote call does not notice.)
            trust_env=True,
        )

    return LoopLocal(make, _close)


async def _close(session: aiohttp.ClientSession) -> None:
    await session.close()


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds to wait: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
