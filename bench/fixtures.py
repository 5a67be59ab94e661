"""Request bodies for the load: the Calenso fixtures, each made unique per request.

The ingress recognises a retransmission by its body, so every request must differ: a body is
split around an insertion point just after its opening brace, and the load generator puts
``"bench_seq":"<run>-<n>",`` there. Calenso's envelope allows extra top-level fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from schemas import CURRENT_TYPES

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "calenso"
LARGE_BYTES = 200_000


@dataclass(frozen=True)
class Body:
    """A body as the text before and after the per-request sequence field."""

    name: str
    prefix: bytes
    suffix: bytes

    def render(self, seq: str) -> bytes:
        return self.prefix + b'"bench_seq":"' + seq.encode() + b'",' + self.suffix

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.suffix) + 24


def _split(name: str, raw: bytes) -> Body:
    start = raw.index(b"{") + 1
    return Body(name, raw[:start], raw[start:])


def fixture_bodies() -> list[Body]:
    """Every fixture of a type calhook handles today (2-3 KB each), nested and flat."""
    if not FIXTURES.is_dir():
        raise SystemExit(f"fixtures not found at {FIXTURES} (../shared next to the project)")
    bodies = []
    for path in sorted(FIXTURES.glob("*.json")):
        raw = path.read_bytes()
        event = json.loads(raw)
        if isinstance(event, dict) and event.get("type") in CURRENT_TYPES:
            bodies.append(_split(path.stem, raw))
    return bodies


def large_body() -> Body:
    """A ~200 KB booking: a real fixture whose customer answered many booking questions."""
    path = FIXTURES / "appointment.booking.created.nested.json"
    event = json.loads(path.read_bytes())
    answers = []
    n = 0
    size = len(path.read_bytes())
    while size < LARGE_BYTES:
        answer = {
            "question_id": 1000 + n,
            "question": f"Frage {n}: Gibt es etwas, das wir vor dem Termin wissen sollten?",
            "answer": "Bitte den Seiteneingang benutzen; Parkplatz 4 ist reserviert. " * 2,
        }
        answers.append(answer)
        size += len(json.dumps(answer)) + 2
        n += 1
    event["data"]["booking_questions"] = answers
    return _split("appointment.booking.created.200kb", json.dumps(event).encode())
