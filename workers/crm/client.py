"""The CRM client interface, and what every adapter shares: HTTP status → retry decision.

Adapters are async (aiohttp, on the worker process's event loop, so the events of a batch wait on
the CRM together) and raise the workers' errors, so the runner's policy applies unchanged: a 429
or 5xx, a timeout or a dropped connection is retried in the call a few times (honouring
``Retry-After`` when it is short), then handed on: a 429 with ``Retry-After`` waits that long
without spending an attempt (``Defer``), a 5xx with one is the next attempt of the schedule
(``RetryLater``), the rest the schedule's next delay; any other 4xx is permanent and goes to the
dead-letter store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from workers.crm.contact import Contact
from workers.errors import Defer, PermanentError, RetryLater, TransientError
from workers.http import Answer, retry_after_s

T = TypeVar("T")

# A Retry-After longer than this is not waited out in the call (it would hold the handler's
# concurrency slot and count against the task time limit); the schedule takes it instead.
QUICK_WAIT_MAX_S = 5.0


class CrmClient(Protocol):
    """What calhook asks of a CRM. Implementations are shared by the coroutines of a worker
    process, on whichever event loop runs them."""

    async def upsert(self, contact: Contact, *, idempotency_key: str) -> None:
        """Create or update the contact of ``contact.calenso_uuid``."""

    async def delete(self, calenso_uuid: str, *, idempotency_key: str) -> None:
        """Delete (or archive) the contact; a contact that is already gone is success."""

    async def close(self) -> None:
        """Release the running event loop's connections."""


class CrmUnavailable(TransientError):
    """Raised when the CRM answered 429 or 5xx, timed out, or could not be reached."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, rate_limited: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.rate_limited = rate_limited


def check(response: Answer, *, ok_statuses: tuple[int, ...] = ()) -> Answer:
    """Return ``response`` if it succeeded; else raise the error that says how to go on."""
    status = response.status_code
    if 200 <= status < 300 or status in ok_statuses:
        return response
    answer = response.text[:500]
    if status == 429 or status >= 500:
        raise CrmUnavailable(
            f"CRM answered {status}: {answer}",
            retry_after_s(response.headers.get("Retry-After")),
            rate_limited=status == 429,
        )
    raise PermanentError(f"CRM answered {status}: {answer}")


def _quickly_retryable(exc: BaseException) -> bool:
    if not isinstance(exc, CrmUnavailable):
        return False
    return exc.retry_after_s is None or exc.retry_after_s <= QUICK_WAIT_MAX_S


class _WaitRetryAfter(wait_base):
    """Wait what the server asked for, else back off exponentially (0.5 s, 1 s, 2 s …)."""

    def __call__(self, retry_state: object) -> float:
        outcome = getattr(retry_state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, CrmUnavailable) and exc.retry_after_s is not None:
            return exc.retry_after_s
        attempt = int(getattr(retry_state, "attempt_number", 1))
        return float(min(0.5 * 2 ** (attempt - 1), QUICK_WAIT_MAX_S))


async def call(fn: Callable[[], Awaitable[T]], *, attempts: int = 3) -> T:
    """Run one CRM call with quick retries; hand a long ``Retry-After`` to the schedule."""

    async def attempt() -> T:
        try:
            return await fn()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CrmUnavailable(f"CRM unreachable: {type(exc).__name__}") from exc

    try:
        async for try_ in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=_WaitRetryAfter(),
            retry=retry_if_exception(_quickly_retryable),
            reraise=True,
        ):
            with try_:
                return await attempt()
    except CrmUnavailable as exc:
        if exc.retry_after_s is not None and exc.rate_limited:
            # Its rate limit: waiting is not failing, no attempt is spent (DESIGN.md rule 4).
            raise Defer(str(exc), after_s=exc.retry_after_s) from exc
        if exc.retry_after_s is not None:
            raise RetryLater(str(exc), after_s=exc.retry_after_s) from exc
        raise
    raise AssertionError("unreachable")  # pragma: no cover
