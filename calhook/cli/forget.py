"""``calhook forget CUSTOMER_UUID``: the right to erasure, for everything calhook keeps in Redis."""

from __future__ import annotations

import json

import click

from calhook import logs
from calhook.cli._common import broker_client
from calhook.settings import get_settings

_LABELS = {
    "events": "events (state, body, trail)",
    "open_work": "open work (queued, running, waiting)",
    "records": "dead letters and parked records",
    "ordering": "order versions",
    "dedup": "dedup keys",
    "notify_marks": "notification marks",
    "recent_failures": "recent failures (status page)",
}


NOT_REACHED = (
    "Not reached: the ingress spool (files on each ingress host, drained into Redis within "
    "seconds while Redis is up: run forget again once it is), and the systems handlers wrote "
    "to (CRM, mail, chat). calhook writes no personal data to its logs."
)


@click.command()
@click.argument("customer_uuid")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON, for scripts.")
def forget(customer_uuid: str, as_json: bool) -> None:
    """Erase one customer's data from every store calhook keeps in Redis (right to erasure).

    Every event whose body mentions CUSTOMER_UUID goes, with its parked record, dead letters,
    open work (queued, running or waiting: it is then never done; erasure wins), and what is
    keyed by those events or by the customer (states, trails, order versions, dedup keys,
    notification marks). Prints counts and ids, never the data.
    """
    from calhook.store.connect import pair_store
    from workers.forget import STORES, ForgetError, forget_customer

    settings = get_settings()
    client = pair_store(broker_client(), settings)
    # The log keeps a record of the erasure: counts only (workers/forget.py).
    logs.configure(settings.log_format, settings.log_level)
    try:
        report = forget_customer(client, customer_uuid)
    except ForgetError as exc:
        raise click.BadParameter(str(exc), param_hint="CUSTOMER_UUID") from None
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    events = len(report.event_ids)
    click.echo(
        f"customer {report.customer_uuid}: {report.total} items removed, "
        f"from {events} event{'' if events == 1 else 's'}"
    )
    width = max(len(label) for label in _LABELS.values())
    for store in STORES:
        click.echo(f"  {_LABELS[store]:<{width}}  {report.removed[store]:>6}")
    if report.work_dropped:
        click.echo(
            f"{report.work_dropped} open pair(s) were erased: their handlers will not run for "
            "this customer (the right to erasure wins over delivery)."
        )
    for event_id in report.event_ids:
        click.echo(f"  event {event_id}")
    click.echo(NOT_REACHED)
