"""Notices to a chat channel through a Slack-compatible incoming webhook.

The message is ``{"text": "*<subject>*\\n<body>"}`` (Slack mrkdwn: a bold first line), rendered
from the same template as the e-mail, posted with aiohttp (a session per event loop). Answers map
to the worker's errors: 2xx is done; 429 is :class:`Defer` with the server's ``Retry-After``,
spending no attempt (a TransientError without one); 5xx, a timeout or a dropped connection is
transient; any other answer is permanent.

The webhook URL is a secret (whoever has it can post to the channel): it is never logged, and no
error calhook raises quotes it (aiohttp's own exceptions, which may, are not chained to them).
"""

from __future__ import annotations

import logging

import aiohttp
import redis.asyncio

from calhook.store.keys import NOTIFY
from workers.errors import Defer, HandlerError, PermanentError, TransientError
from workers.http import Answer, read_answer, retry_after_s, sessions
from workers.notify.templates import Rendered

log = logging.getLogger("calhook.notify")

POSTED_TTL_S = 7 * 24 * 3600
"""How long a posted notice is remembered, so a redelivery does not post it again."""
TIMEOUT_S = 10.0

# One session per event loop for every post (the deadline is set per request).
_sessions = sessions(TIMEOUT_S)


def chat_text(rendered: Rendered) -> str:
    """The chat message: the subject in bold, then the body; Slack's control characters escaped."""
    return f"*{_escape(rendered.subject)}*\n{_escape(rendered.body).rstrip()}"


def _escape(text: str) -> str:
    # Slack reads <…> as links or mentions (<!channel>); a customer's name must not ping anyone.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def posted_key(idempotency_key: str) -> str:
    """Redis key marking that the chat notice of an (event, handler) was posted."""
    return f"{NOTIFY}posted:{idempotency_key}"


async def post_chat(
    client: redis.asyncio.Redis,
    webhook_url: str,
    text: str,
    *,
    idempotency_key: str,
    timeout_s: float = TIMEOUT_S,
) -> bool:
    """POST ``text`` to the webhook once per ``idempotency_key``; False if it was posted before.

    An incoming webhook offers no idempotency key of its own; the Redis mark narrows a double
    post to a crash between the server's 2xx and the mark.
    """
    key = posted_key(idempotency_key)
    if await client.exists(key):
        log.info("chat notice already posted")
        return False
    problem: HandlerError | None = None
    try:
        response = await _post(webhook_url, {"text": text}, timeout_s)
    except TimeoutError as exc:
        problem = TransientError(f"chat webhook timed out: {type(exc).__name__}")
    except aiohttp.ClientError as exc:
        problem = TransientError(f"chat webhook unreachable: {type(exc).__name__}")
    if problem is not None:
        # Raised outside the except block, so no aiohttp exception (which may hold the URL)
        # hangs on this one as its context.
        raise problem
    _check(response)
    await client.set(key, 1, ex=POSTED_TTL_S)
    log.info("chat notice posted", extra={"status": response.status_code})
    return True


async def _post(url: str, body: object, timeout_s: float) -> Answer:
    session = await _sessions.get()
    async with session.post(
        url, json=body, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as response:
        return await read_answer(response)


def _check(response: Answer) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    what = f"chat webhook answered {status}: {' '.join(response.text.split())[:200]}"
    if status == 429:
        after_s = retry_after_s(response.headers.get("Retry-After"))
        if after_s is not None:
            # Its rate limit: waiting is not failing, no attempt is spent (DESIGN.md rule 4).
            raise Defer(what, after_s=after_s)
        raise TransientError(what)
    if status >= 500:
        raise TransientError(what)
    raise PermanentError(what)
