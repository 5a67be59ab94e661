"""Personal data and secrets stay out of logs (DESIGN.md rule 7, issue 7).

Given every Calenso fixture; when each goes through the real ingress and a real worker (CRM,
e-mail and chat notices included); then neither the in-process log records nor the worker's log
hold any fixture's e-mail, phone, full name or address. The scanner itself is shown to find a
fixture e-mail logged on purpose, so that a clean scan means something.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from calhook.logs import JsonFormatter, RedactMessageBodies
from calhook.messages import read_task_message
from calhook.store.pairs import PairStore
from tests.conftest import OPS_MAILBOX, SECRET, Client, fixture_files, queues_drained
from tests.security.conftest import DEFAULT_HEADER, DEFAULT_SECRETS, SHOP_SECRETS, Ingress
from tests.support.chat_server import ChatServer
from tests.support.fake_crm import TOKEN as CRM_TOKEN
from tests.support.fake_crm import FakeCrm
from tests.support.leaks import LeakScan, Needle, personal_data
from tests.support.smtp_server import SmtpServer
from tests.support.store import accept, route
from tests.support.waiting import await_for
from tests.support.worker import TEST_HANDLER_MODULES, WorkerProcess

NEEDLES = personal_data(fixture_files())
EMAIL = "luca.brunner@example.org"  # the customer of customer.created.nested.json


@pytest.fixture(scope="module")
def pipeline_worker(
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    fake_crm_server: FakeCrm,
    smtp_server: SmtpServer,
    chat_server: ChatServer,
) -> Iterator[WorkerProcess]:
    """A real worker with every integration on, like the session's ``worker_process``.

    Its own, stopped when this module ends: the session's worker would go on consuming the
    dispatch queue during later modules that expect nobody to (tests/test_cli.py).
    """
    worker = WorkerProcess(
        redis_url,
        tmp_path_factory.mktemp("leaks") / "worker.log",
        2,
        CALHOOK_HANDLER_MODULES=f"{TEST_HANDLER_MODULES},workers.tasks.crm,workers.tasks.notify",
        CALHOOK_CRM_KIND="http",
        CALHOOK_CRM_URL=fake_crm_server.url,
        CALHOOK_CRM_TOKEN=CRM_TOKEN,
        CALHOOK_CRM_RATE_PER_S="1000",
        CALHOOK_SMTP_URL=smtp_server.url(),
        CALHOOK_NOTIFY_FROM="calhook@example.com",
        CALHOOK_NOTIFY_TO=OPS_MAILBOX,
        CALHOOK_CHAT_WEBHOOK_URL=chat_server.url,
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def scan() -> Iterator[LeakScan]:
    """A leak scan of every in-process log record of the test."""
    handler = LeakScan(NEEDLES)
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def kinds(needles: list[Needle]) -> set[str]:
    return {n.kind for n in needles}


def test_personal_data_is_collected_from_every_kind_of_field() -> None:
    assert kinds(NEEDLES) == {"e-mail", "phone", "name", "address"}
    scanner = LeakScan(NEEDLES)
    text = f"to {EMAIL.upper()}, Luca  Brunner, +41 79 000 01 42, Musterweg 7, 0790000142"
    found = {(n.kind, n.masked) for n in scanner.search(text)}
    assert found == {
        ("e-mail", "l***@e***.org"),
        ("name", "L*** B***"),
        ("phone", "+41*******42"),
        ("address", "M*** 7"),
    }
    # Masked values, ids and timestamps are not personal data.
    assert scanner.search("l***@e***.org +41*******42 L. 1764206998790000142 Luca B.") == []


def test_scanner_finds_a_fixture_email_logged_on_purpose(tmp_path: Path) -> None:
    scanner = LeakScan(NEEDLES)
    logger = logging.getLogger("tests.security.deliberate_leak")
    logger.propagate = False  # the session's own scan must not see this deliberate leak
    logger.addHandler(scanner)
    try:
        logger.warning("sending the notice to %s", EMAIL)
    finally:
        logger.removeHandler(scanner)
        logger.propagate = True
    log_file = tmp_path / "worker.log"
    log_file.write_text('{"logger": "calhook.notify", "msg": "to Luca.Brunner%40example.org"}\n')
    scanner.scan_file(log_file)

    assert [str(f) for f in scanner.leaks] == [
        "e-mail l***@e***.org in a WARNING record of logger tests.security.deliberate_leak "
        f"({scanner.leaks[0].where.split('(', 1)[1]}",
        f"e-mail l***@e***.org in {log_file} (line 1 of the part read)",
    ]
    assert EMAIL not in scanner.report()


async def test_every_fixture_through_ingress_and_worker_logs_no_personal_data(
    pipeline_worker: WorkerProcess, client: Client, redis_db: redis.Redis, scan: LeakScan
) -> None:
    worker = pipeline_worker
    worker_log_start = worker.log_path.stat().st_size
    accepted = []
    for path in fixture_files():
        response = await client.post(
            "/webhooks/calenso",
            data=path.read_bytes(),
            headers={"Authorization": SECRET, "Content-Type": "application/json"},
        )
        assert response.status == 202, await response.text()
        accepted.append((await response.json())["event_id"])

    await await_for(lambda: queues_drained(redis_db), timeout_s=60, what="queues to drain")
    # Every event was handled (its trail is there): the scan covers the whole pipeline.
    for event_id in accepted:
        assert redis_db.exists(f"calhook:trail:{event_id}"), event_id
    lines = worker.log_path.read_bytes()[worker_log_start:].decode("utf-8", "replace")
    assert sum(line.count('"event_id"') for line in lines.splitlines()) >= len(accepted)
    scan.scan_file(worker.log_path, start=worker_log_start)

    assert not scan.leaks, f"personal data in the logs:\n{scan.report(scan.leaks)}"


def test_secrets_sent_malformed_stay_out_of_the_logs(
    ingress: Ingress, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for secret in (DEFAULT_SECRETS[0], SHOP_SECRETS[0]):
        encoded = secret.encode()
        for value in (encoded + b"\x01", encoded + b"\xff", b"\x7f" + encoded):
            ingress.request("POST", "/webhooks/calenso", [(DEFAULT_HEADER, value)], b"{}")
        ingress.request("POST", "/webhooks/calenso/shop", [("X-Shop-Key", secret[:-1])], b"{}")

    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert caplog.records, "the refusals were logged"
    for secret in (DEFAULT_SECRETS[0], SHOP_SECRETS[0]):
        assert secret[:-1] not in text


def test_celery_task_arguments_are_not_logged() -> None:
    # A task message without kwargsrepr (another producer, a team's .delay(), a hand-made
    # message): Celery's 'received' and 'succeeded' lines carry its real kwargs.
    body = (fixture_files()[0].parent / "customer.created.nested.json").read_text()
    record = logging.LogRecord(
        "celery.app.trace",
        logging.INFO,
        __file__,
        1,
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        None,
        None,
    )
    record.args = {"name": "calhook.dispatch", "id": "e-1", "runtime": 0.01, "return_value": None}
    record.data = {"id": "e-1", "kwargs": repr({"event_id": "e-1", "body": body})}

    # What calhook.logs.configure wires: the redaction filter, then the JSON formatter.
    RedactMessageBodies().filter(record)
    line = orjson.loads(JsonFormatter().format(record))

    assert EMAIL not in orjson.dumps(line).decode()


def test_calhooks_own_task_arguments_stay_in_celerys_lines(quiet_pairs: PairStore) -> None:
    # Given: the arguments calhook's own messages show (event ids, never bodies), as the store's
    # scripts write them: a dispatch message and a handler's.
    body = (fixture_files()[0].parent / "customer.created.nested.json").read_bytes()
    event_id = accept(quiet_pairs, body)
    route(quiet_pairs, event_id, [("crm.sync_customer", "crm")])
    for queue in ("dispatch", "crm"):
        raw = quiet_pairs.client.lindex(queue, 0)
        assert isinstance(raw, bytes)
        _, _, kwargs, headers = read_task_message(raw)
        own = headers["kwargsrepr"]
        assert orjson.loads(own) == kwargs
        assert event_id in kwargs["ids"]
        record = logging.LogRecord(
            "celery.worker.strategy", logging.INFO, __file__, 1, "x", None, None
        )
        record.data = {"id": headers["id"], "args": "()", "kwargs": own}

        # When Celery logs the message's arrival.
        RedactMessageBodies().filter(record)

        # Then: the ids stay, for the operator to follow the event.
        kept = {"id": headers["id"], "args": "()", "kwargs": own}
        assert record.data == kept, queue  # type: ignore[attr-defined]
