"""``calhook``: the one command people use to run and inspect the pipeline.

One module per command group, each above every other layer of calhook (no module of the kernel,
the store, the ingress or the workers imports this package): ``processes`` (serve, worker,
scheduler, exporter, dev), ``send`` (send, schema), ``queues``, ``events``, ``dlq``, ``parked``,
``handlers`` (pause, resume), ``failures`` (failure groups), ``forget``; ``_common`` holds what
they share.
"""

from __future__ import annotations

import click

from calhook import __version__
from calhook.cli import dlq, events, failures, forget, handlers, parked, processes, queues, send


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="calhook")
def main() -> None:
    """Receive Calenso webhooks and turn each into reliable Celery work."""


for _command in (
    processes.serve,
    processes.worker,
    processes.scheduler,
    processes.exporter,
    processes.dev,
    send.send,
    send.schema,
    queues.queues,
    events.events,
    dlq.dlq,
    parked.parked,
    handlers.handlers,
    failures.failures,
    forget.forget,
):
    main.add_command(_command)
