"""The ingress's error tree; :mod:`ingest.app` maps each to its HTTP status in one place."""

from __future__ import annotations

from collections.abc import Mapping


class IngestError(Exception):
    """Raised when a request cannot be accepted; carries the status and a machine-readable code.

    ``headers`` go on the answer; ``close`` ends the connection after it (the rest of a request
    we stopped reading is not worth waiting for).
    """

    status = 400
    code = "bad_request"
    headers: Mapping[str, str] = {}
    close = False

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


class Forbidden(IngestError):
    """Raised when the client's address is outside ``CALHOOK_ALLOWED_IPS``."""

    status = 403
    code = "forbidden"


class BodyTimeout(IngestError):
    """Raised when the body did not arrive within ``CALHOOK_BODY_TIMEOUT_S``."""

    status = 408
    code = "body_timeout"
    close = True


class HeadersTooLarge(IngestError):
    """Raised when the request's head exceeds ``CALHOOK_MAX_HEADER_BYTES``."""

    status = 431
    code = "headers_too_large"


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


class UnreadableBody(IngestError):
    """Raised when the body's framing is broken (chunked encoding, length) or cut short."""

    status = 400
    code = "unreadable_body"
    close = True


class JsonTooDeep(IngestError):
    """Raised when objects and arrays nest deeper than ``CALHOOK_MAX_JSON_DEPTH``."""

    status = 422
    code = "json_too_deep"


class NumberOutOfRange(IngestError):
    """Raised when a JSON number is too large for a double (orjson cannot read it)."""

    status = 422
    code = "number_out_of_range"


class UnusableEnvelope(IngestError):
    """Raised when the JSON is not a Calenso envelope: not an object, no string type, no data."""

    status = 422
    code = "invalid_envelope"


class Unavailable(IngestError):
    """Raised when the event could not be made durable; the sender should send it again."""

    status = 503
    code = "unavailable"


class Overloaded(IngestError):
    """Raised when ``CALHOOK_MAX_CONCURRENT`` webhook requests are already in progress."""

    status = 503
    code = "overloaded"
    headers = {"Retry-After": "1"}
