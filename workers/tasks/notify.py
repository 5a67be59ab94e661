"""Notification handlers: e-mail and chat notices of cancelled and moved bookings and failed
payments, on the ``notify`` queue.

Two handlers, ``notify.email`` and ``notify.chat``, so a chat outage never re-sends an e-mail and
vice versa. Each runs only when configured (CALHOOK_SMTP_URL, CALHOOK_CHAT_WEBHOOK_URL: their
``enabled=`` predicates): a deployment without them parks nothing and fails nothing. A bad SMTP
URL or template override fails at worker start, not at the first cancellation.

Both are ``async def``: they run on the worker process's event loop (aiosmtplib, aiohttp,
redis.asyncio), the events of a batch concurrently.
"""

from __future__ import annotations

from calhook.settings import Settings, get_settings
from workers.connections import async_redis_client
from workers.notify.mail import SmtpUrl
from workers.notify.messages import NOTIFY_TYPES, NotifyEvent
from workers.notify.send import send_chat, send_email
from workers.notify.templates import check_templates
from workers.registry import HandlerContext, Registry, registry

NOTIFY_QUEUE = "notify"
EMAIL_HANDLER = "notify.email"
CHAT_HANDLER = "notify.chat"


async def notify_email(event: NotifyEvent, ctx: HandlerContext) -> None:
    """Mail the notice of ``event`` to the staff member and CALHOOK_NOTIFY_TO."""
    await send_email(event, ctx, settings=get_settings(), client=await async_redis_client())


async def notify_chat(event: NotifyEvent, ctx: HandlerContext) -> None:
    """Post the notice of ``event`` to CALHOOK_CHAT_WEBHOOK_URL."""
    await send_chat(event, ctx, settings=get_settings(), client=await async_redis_client())


def mail_configured(settings: Settings) -> bool:
    """notify.email runs when CALHOOK_SMTP_URL is set; a bad URL or template override stops the
    worker at start, not at the first cancellation."""
    if not settings.smtp_url:
        return False
    SmtpUrl.parse(settings.smtp_url)
    check_templates(settings.template_dir)
    return True


def chat_configured(settings: Settings) -> bool:
    """notify.chat runs when CALHOOK_CHAT_WEBHOOK_URL is set."""
    if not settings.chat_webhook_url.get_secret_value():
        return False
    check_templates(settings.template_dir)
    return True


def declare(target: Registry) -> None:
    """Register both notify handlers with ``target``; each runs where it is configured."""
    target.handler(*NOTIFY_TYPES, queue=NOTIFY_QUEUE, name=EMAIL_HANDLER,
                   enabled=mail_configured)(notify_email)  # fmt: skip
    target.handler(*NOTIFY_TYPES, queue=NOTIFY_QUEUE, name=CHAT_HANDLER,
                   enabled=chat_configured)(notify_chat)  # fmt: skip


declare(registry)
