"""Notices end to end: a cancellation posted to the ingress reaches the staff member and the
ops mailbox by e-mail and the chat, each exactly once, even when the chat fails for a while."""

from __future__ import annotations

from calhook.store.pairs import PairStore
from tests.conftest import FIXTURES, OPS_MAILBOX, SECRET, Client
from tests.support.chat_server import ChatServer
from tests.support.smtp_server import SmtpServer
from tests.support.waiting import await_for
from tests.support.worker import WorkerProcess
from workers.notify.mail import message_id

AUTH = {"Authorization": SECRET, "Content-Type": "application/json"}
STAFF = "sandro.meier@example.com"  # the booked resource in the appointment samples


def outcome(pairs: PairStore, event_id: str, handler: str) -> str | None:
    """The state of the (event, handler) pair: None until dispatch created it."""
    pair = pairs.states(event_id).get(handler)
    return pair.state if pair else None


def mails_of(smtp: SmtpServer, event_id: str) -> dict[str, list[str]]:
    """Recipient → subjects of the mails calhook sent about ``event_id``."""
    found: dict[str, list[str]] = {}
    for recipient in (STAFF, OPS_MAILBOX):
        ids = message_id(event_id, recipient)
        found[recipient] = [
            str(r.message["Subject"]) for r in smtp.received if r.message["Message-ID"] == ids
        ]
    return found


async def test_a_cancellation_is_mailed_and_posted_once_despite_a_chat_outage(
    client: Client,
    worker: WorkerProcess,
    pairs: PairStore,
    smtp_server: SmtpServer,
    chat_server: ChatServer,
) -> None:
    posts_before = len(chat_server.posts)
    chat_server.fail_next(500, times=2)  # quick retries in the call, or the schedule, get past it
    body = (FIXTURES / "appointment.booking.cancelled.nested.json").read_bytes()

    response = await client.post("/webhooks/calenso", data=body, headers=AUTH)
    event_id = str((await response.json())["event_id"])

    await await_for(lambda: outcome(pairs, event_id, "notify.email") == "done")
    await await_for(lambda: outcome(pairs, event_id, "notify.chat") == "done")
    mails = mails_of(smtp_server, event_id)
    assert len(mails[STAFF]) == 1
    assert len(mails[OPS_MAILBOX]) == 1
    assert mails[STAFF] == ["Storniert: Luca Brunner, 20.03.2025 14:00"]
    new_posts = chat_server.posts[posts_before:]
    assert len(new_posts) == 1
    assert "Luca Brunner" in new_posts[0]["text"]
    assert "20.03.2025 14:00" in new_posts[0]["text"]
