"""Notifications: tell staff and ops by e-mail and chat when a booking is cancelled or moved, or
its payment failed.

- :mod:`~workers.notify.messages`: the :class:`Notice` of an event (kind, language, placeholder
  values) and its e-mail recipients.
- :mod:`~workers.notify.templates`: the built-in ``templates/<lang>/<kind>.txt`` and overrides
  from CALHOOK_TEMPLATE_DIR.
- :mod:`~workers.notify.mail`: SMTP, one message per recipient, each sent once.
- :mod:`~workers.notify.chat`: a Slack-compatible incoming webhook.
- :mod:`~workers.notify.send`: the two paths as plain functions; :mod:`workers.tasks.notify`
  registers them as handlers.
"""
