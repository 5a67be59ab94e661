"""The worker side: the Celery app, dispatch, the handler registry and handler modules."""
