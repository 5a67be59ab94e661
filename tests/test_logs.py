"""Log lines: JSON with the bound fields, personal data cut from Celery's complaints, and the
ingress's lines written off the event loop."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from calhook import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("background", [False, True])
def test_bound_fields_appear_on_every_line(
    capfd: pytest.CaptureFixture[str], background: bool
) -> None:
    logs.configure("json", "INFO", background=background)

    with logs.bind(event_id="e-1", handler="audit"):
        logging.getLogger("calhook.test").info("hello", extra={"outcome": "ok"})
    logging.getLogger("calhook.test").info("outside")
    logs.stop_background()

    first, second = lines(capfd.readouterr().err)
    assert first["msg"] == "hello"
    assert (first["event_id"], first["handler"], first["outcome"]) == ("e-1", "audit", "ok")
    assert second["msg"] == "outside"
    assert "event_id" not in second


def test_celery_message_bodies_are_redacted(capfd: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "INFO")

    logging.getLogger("celery.worker.consumer.consumer").error(
        "Received unregistered task of type %r.\nThe full contents of the message body was:\n%s",
        "calhook.handler.gone",
        '{"customer": {"email": "anna.muster@example.org"}}',
    )

    [line] = lines(capfd.readouterr().err)
    assert "anna.muster" not in json.dumps(line)
    assert str(line["msg"]).endswith("[message body redacted]")
    assert "calhook.handler.gone" in str(line["msg"])


@pytest.mark.parametrize(("level", "shown"), [("INFO", ["failed"]), ("DEBUG", ["ok", "failed"])])
def test_celerys_per_task_lines_show_only_when_debugging(
    capfd: pytest.CaptureFixture[str], level: str, shown: list[str]
) -> None:
    logs.configure("json", level)

    trace = logging.getLogger("celery.app.trace")
    trace.info("ok")
    trace.error("failed")

    assert [line["msg"] for line in lines(capfd.readouterr().err)] == shown
