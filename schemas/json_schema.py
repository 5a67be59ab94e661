"""A JSON Schema document for the envelope and the canonical event views."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from schemas.catalogue import KNOWN_TYPES, family_of
from schemas.envelope import Envelope
from schemas.events import EVENT_MODELS, MODEL_BY_FAMILY

_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def event_json_schema() -> dict[str, Any]:
    """Return a JSON Schema (2020-12) describing what Calenso sends and what handlers receive.

    ``$defs`` holds :class:`Envelope` (as received) and every canonical event model with its parts
    (as dumped by ``model_dump(mode="json")``); the document itself matches any canonical event.
    ``x-event-types`` maps each catalogued type to its model. The output is deterministic.
    """
    _, schema = models_json_schema(
        [(Envelope, "validation"), *((model, "serialization") for model in EVENT_MODELS)],
        ref_template="#/$defs/{model}",
    )
    defs: dict[str, Any] = schema.get("$defs", {})
    event_types = {}
    for event_type in sorted(KNOWN_TYPES):
        family = family_of(event_type)
        assert family is not None
        event_types[event_type] = MODEL_BY_FAMILY[family].__name__
    return {
        "$schema": _DIALECT,
        "title": "Calenso webhook events",
        "description": (
            "Envelope: the body Calenso POSTs. Event models: the canonical view of its data, "
            "the same for nested and flat payloads. Unknown types parse as UnknownEvent."
        ),
        "anyOf": [{"$ref": f"#/$defs/{model.__name__}"} for model in EVENT_MODELS],
        "x-event-types": event_types,
        "$defs": dict(sorted(defs.items())),
    }
