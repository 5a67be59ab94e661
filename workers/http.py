"""What handlers that call HTTP services share."""

from __future__ import annotations

import datetime as dt
import email.utils


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds to wait: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
