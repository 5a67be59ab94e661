"""The ingress's error tree; :mod:`ingest.app` maps each to its HTTP status in one place."""

from __future__ import annotations


class IngestError(Exception):
    """Raised when a request cannot be accepted; carries the status and a machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownEndpoint(IngestError):
    """Raised when the path names an endpoint that is not configured."""

    status = 404
    code = "unknown_endpoint"


class Unauthorized(IngestError):
    """Raised when the secret header is missing or matches no accepted secret."""

    status = 401
    code = "unauthorized"


class BodyTooLarge(IngestError):
    """Raised when the body exceeds ``CALHOOK_MAX_BODY_BYTES``."""

    status = 413
    code = "body_too_large"


class NotJson(IngestError):
    """Raised when the body is not JSON and was not declared as JSON either."""

    status = 415
    code = "unsupported_media_type"


class MalformedJson(IngestError):
    """Raised when a body declared as JSON does not parse."""

    status = 400
    code = "malformed_json"


class UnusableEnvelope(IngestError):
    """Raised when the JSON is not a Calenso envelope: not an object, no string type, no data."""

    status = 422
    code = "invalid_envelope"


class Unavailable(IngestError):
    """Raised when the event could not be made durable; the sender should send it again."""

    status = 503
    code = "unavailable"
