"""calhook: receive Calenso webhooks and turn every one of them into reliable Celery work."""

__version__ = "0.1.0"
