"""What a failure group may show of an error's text (calhook.privacy.scrub)."""

from __future__ import annotations

import json

from calhook.privacy import payload_strings, scrub
from tests.conftest import FIXTURES


def test_scrub_masks_what_the_event_says_of_the_person_and_common_identifiers() -> None:
    body = json.loads((FIXTURES / "customer.created.nested.json").read_text())
    known = payload_strings(body)
    error = (
        "CrmError: contact Luca Brunner (Musterweg 7, Zürich) rejected for "
        "luca.brunner@example.org, +41 79 000 01 42, c3a9e5d2-41b7-4f0e-8c2d-6e1f0a9b7d34, "
        "value 'Brunner-Meier' on 2025-03-14"
    )
    scrubbed = scrub(error, known)
    for personal in (
        "Luca",
        "Brunner",
        "Musterweg",
        "Zürich",
        "luca.brunner",
        "000 01",
        "c3a9e5d2",
    ):
        assert personal not in scrubbed
    assert scrubbed.startswith("CrmError: contact *** *** (***, ***) rejected for ***")
    assert "2025-03-14" in scrubbed
    assert scrub("CrmUnavailable: CRM answered 503: down for maintenance") == (
        "CrmUnavailable: CRM answered 503: down for maintenance"
    )
    # In another case, in part, and a name of two letters.
    assert scrub("contact LUCA BRUNNER rejected", known) == "contact *** *** rejected"
    assert scrub("Name Li, Wei", payload_strings({"name": "Li", "first": "Wei"})) == "Name ***, ***"
    assert scrub("street Musterweg", known) == "street ***"
    assert "luca.brunner@example" not in scrub("to luca.brunner@example failed")
    # Without the event's strings, the patterns still catch the usual suspects.
    assert scrub("for luca.brunner@example.org, +41 79 000 01 42, 'Anna'") == (
        "for l***@e***.org, ***, '***'"
    )
    assert len(scrub("x" * 1000)) == 300
