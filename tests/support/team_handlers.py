"""A team's handler module, as a new team would write one (tests/workers/test_routes.py)."""

from __future__ import annotations

import os

from schemas import CustomerEvent
from workers.registry import HandlerContext, handler


@handler("customer.created", queue="team", name="team.welcome")
def welcome(event: CustomerEvent, ctx: HandlerContext) -> None:
    """Would greet the new customer."""


@handler("customer.updated", queue="team", name="team.mirror",
         enabled=lambda settings: bool(os.environ.get("TEAM_MIRROR_URL")))  # fmt: skip
def mirror(event: CustomerEvent, ctx: HandlerContext) -> None:
    """Would mirror the customer to TEAM_MIRROR_URL (configured per worker: a mistake)."""
