"""The Celery app for ``celery -A workers.celery_app`` (``calhook worker`` is the usual way)."""

from workers.app import create_celery

app = create_celery()
