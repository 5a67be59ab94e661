"""``calhook serve | worker | scheduler | exporter | dev``: the long-running processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from calhook import logs
from calhook.cli._common import broker_settings, cli_settings
from calhook.constants import DISPATCH_QUEUE
from calhook.settings import Settings, SettingsError


@click.command()
@click.option("--host", default=None, help="Bind address [CALHOOK_HOST].")
@click.option("--port", type=int, default=None, help="Port [CALHOOK_PORT].")
def serve(host: str | None, port: int | None) -> None:
    """Run the HTTP ingress (and its admin listener when CALHOOK_ADMIN_PORT is set)."""
    from ingest.server import run

    settings = cli_settings()
    logs.configure(settings.log_format, settings.log_level, background=True)
    try:
        settings.require_redis_url()
        run(settings, host, port)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _all_queues() -> list[str]:
    from workers.registry import load_handlers

    registry = load_handlers(cli_settings())
    return [DISPATCH_QUEUE, *sorted(registry.queues() - {DISPATCH_QUEUE})]


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default=None, help="Comma-separated queues [all of them].")
@click.option("-c", "--concurrency", type=int, default=None, help="Child processes [CPUs].")
@click.option("-P", "--pool", default="prefork", show_default=True, help="Celery pool.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    queues: str | None, concurrency: int | None, pool: str, celery_args: tuple[str, ...]
) -> None:
    """Run a Celery worker on the given queues (extra arguments go to Celery)."""
    # SIGTERM (docker stop, systemd, Kubernetes) starts Celery's soft shutdown: running tasks
    # get CALHOOK_SOFT_SHUTDOWN_S to finish, the rest is requeued. Without the remap, SIGTERM
    # waits without limit and the orchestrator's SIGKILL cuts tasks midway. billiard reads the
    # variable when it is imported, so it is set before Celery is.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    try:
        cli_settings().require_redis_url()
        from workers.app import create_celery

        app = create_celery()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    from workers.connections import redis_client
    from workers.durability import warn_if_not_durable

    settings = cli_settings()
    logs.configure(settings.log_format, settings.log_level)
    warn_if_not_durable(redis_client())
    argv = ["worker", "-Q", queues or ",".join(_all_queues()), "-P", pool, "--without-mingle"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    app.worker_main([*argv, *celery_args])


@click.command()
def scheduler() -> None:
    """Queue what is due: retries, runs whose worker died, messages lost in transit (run one or
    more); and erase what is past the retention."""
    import threading

    from calhook.store.connect import pair_store
    from workers.connections import redis_client
    from workers.scheduler import run_scheduler

    settings = broker_settings()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_scheduler(pair_store(redis_client(), settings), settings, stop)


@click.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Bind address.")  # noqa: S104
@click.option("--port", type=int, default=9108, show_default=True, help="Port of /metrics.")
def exporter(host: str, port: int) -> None:
    """Serve Prometheus metrics of the worker side (queues, handler outcomes, durations)."""
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    from workers.connections import redis_client
    from workers.exporter import FleetCollector
    from workers.registry import load_handlers

    settings = broker_settings()
    # Every queue a handler may use, configured here or not (the exporter reads, runs nothing).
    registry = load_handlers(settings, tolerant=True)
    queues = {h.queue for h in registry} | {h.queue for h, _ in registry.inactive.values()}
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(FleetCollector(redis_client(), queues))
    server, thread = start_http_server(port, addr=host, registry=metrics)
    logging.getLogger("calhook.exporter").info("exporter listening", extra={"port": port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)


@click.command()
@click.option("--port", type=int, default=None, help="Ingress port [CALHOOK_PORT].")
@click.option(
    "--sentinel",
    is_flag=True,
    help="Embed a master, a replica and three sentinels, and follow the master through them "
    "(acknowledgements `replicated` unless CALHOOK_ACK_DURABILITY says otherwise).",
)
def dev(port: int | None, sentinel: bool) -> None:
    """Run everything for development: Redis (embedded if REDIS_URL is unset), the ingress, a worker
    and the scheduler."""
    from calhook.redis_server import RedisServer, RedisServerError
    from calhook.sentinel_cluster import SentinelCluster

    settings = cli_settings()
    env = dict(os.environ)
    env.setdefault("CALHOOK_LOG_FORMAT", "console")
    env.setdefault("CALHOOK_SPOOL_DIR", str(Path(settings.data_dir) / "spool"))
    server: RedisServer | SentinelCluster | None = None
    if sentinel and settings.redis_url:
        raise click.UsageError("--sentinel embeds its own servers: unset REDIS_URL")
    if not settings.redis_url:
        data = Path(settings.data_dir)
        server = SentinelCluster(data / "sentinel") if sentinel else RedisServer(data / "redis")
        try:
            env["REDIS_URL"] = server.start()
        except RedisServerError as exc:
            raise click.ClickException(str(exc)) from None
        if sentinel:
            env.setdefault("CALHOOK_ACK_DURABILITY", "replicated")
    port = port if port is not None else settings.port
    me = [sys.executable, "-m", "calhook"]
    children = [
        subprocess.Popen([*me, "serve", "--port", str(port)], env=env),
        subprocess.Popen([*me, "worker", "-c", "2"], env=env),
        subprocess.Popen([*me, "scheduler"], env=env),
    ]
    embedded = ""
    if isinstance(server, RedisServer):
        embedded = f" (embedded, data in {server.data_dir})"
    elif server is not None:
        ports = ", ".join(str(s.port) for s in server.servers)
        embedded = (
            f" (embedded: master and replica on ports {ports}, acknowledgements "
            f"{env['CALHOOK_ACK_DURABILITY']}; fail over with "
            f"`redis-cli -p {server.sentinel_ports[0]} SENTINEL FAILOVER {server.master_name}`)"
        )
    secret = settings.auth_secrets[0].get_secret_value() if settings.auth_secrets else None
    # What works from another terminal, where neither the secret nor the port is set.
    url = f"http://127.0.0.1:{port}/webhooks/calenso"
    try_send = "calhook send" + (f" --secret {secret}" if secret else "")
    if port != Settings.model_fields["port"].default:
        try_send += f" --url {url}"
    click.echo(
        f"\ncalhook is running.\n"
        f"  Redis:   {env['REDIS_URL']}{embedded}\n"
        f"  Post to: {url}"
        f"{f' with header {settings.auth_header}: {secret}' if secret else ''}\n"
        f"  Try:     {try_send} ../shared/fixtures/calenso/customer.created.nested.json\n"
        f"  Inspect: REDIS_URL={env['REDIS_URL']} calhook queues --watch\n"
        f"  Stop:    Ctrl-C\n",
        err=True,
    )
    terminated = []

    def on_sigterm(*_: object) -> None:
        terminated.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        # Ctrl-C reached every child already (one process group); a second SIGINT would make
        # Celery cut its tasks. SIGTERM reached only us: pass it on.
        for child in children:
            if terminated and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None:
            server.stop()
