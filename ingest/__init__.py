"""The HTTP ingress: authenticate, check, make durable, answer."""

from ingest.app import create_app

__all__ = ["create_app"]
