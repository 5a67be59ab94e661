"""A team's handler module, as a new team would write one (tests/workers/test_routes.py)."""

from __future__ import annotations

from schemas import CustomerEvent
from workers.registry import HandlerContext, handler


@handler("customer.created", queue="team", name="team.welcome")
def welcome(event: CustomerEvent, ctx: HandlerContext) -> None:
    """Would greet the new customer."""
