"""The two notice paths, as plain coroutines of (event, context, settings, Redis).

:mod:`workers.tasks.notify` registers thin async handlers that call these with the process's
settings and the event loop's Redis client; tests call them with their own.
"""

from __future__ import annotations

import email.utils
import logging
import ssl
from datetime import UTC, datetime

import redis.asyncio

from calhook.settings import Settings
from schemas import CalensoEvent
from workers.notify.chat import chat_text, post_chat
from workers.notify.mail import SentLog, SmtpUrl, build_message, send_messages
from workers.notify.messages import build_notice, recipients
from workers.notify.templates import render
from workers.registry import HandlerContext

log = logging.getLogger("calhook.notify")


async def send_email(
    event: CalensoEvent,
    ctx: HandlerContext,
    *,
    settings: Settings,
    client: redis.asyncio.Redis,
    tls_context: ssl.SSLContext | None = None,
) -> int:
    """Mail the notice of ``event`` to each recipient not mailed yet; return how many now.

    No recipient is not an error: the notice is logged as unsent and the handler is done.
    """
    notice = build_notice(event, settings)
    to = recipients(notice, settings)
    if not to:
        log.info("notice has no recipient", extra={"kind": notice.kind.value})
        return 0
    rendered = render(notice.kind, notice.language, notice.fields, settings.template_dir)
    # The delivery's arrival, not the clock: a retry must build a byte-identical message.
    date = datetime.fromtimestamp(ctx.received_at, UTC) if ctx.received_at > 0 else event.created
    messages = [
        (
            recipient,
            build_message(
                rendered,
                sender=settings.notify_from,
                recipient=recipient,
                event_id=ctx.event_id,
                date=date,
                language=notice.language,
            ),
        )
        for recipient in to
    ]
    envelope_from = email.utils.parseaddr(settings.notify_from)[1] or settings.notify_from
    return await send_messages(
        SmtpUrl.parse(settings.smtp_url),
        envelope_from,
        messages,
        SentLog(client, ctx.idempotency_key),
        tls_context=tls_context,
    )


async def send_chat(
    event: CalensoEvent, ctx: HandlerContext, *, settings: Settings, client: redis.asyncio.Redis
) -> bool:
    """Post the notice of ``event`` to the chat webhook; False if it was posted before."""
    notice = build_notice(event, settings)
    rendered = render(notice.kind, notice.language, notice.fields, settings.template_dir)
    return await post_chat(
        client,
        settings.chat_webhook_url.get_secret_value(),
        chat_text(rendered),
        idempotency_key=ctx.idempotency_key,
    )
