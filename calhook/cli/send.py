"""``calhook send`` and ``calhook schema``: post a file as Calenso would; print the event schema."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import click

from calhook.cli._common import cli_settings


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--url", default=None, help="Ingress URL [http://127.0.0.1:$CALHOOK_PORT/…].")
@click.option("--endpoint", default=None, help="A named endpoint instead of the default one.")
@click.option("--secret", default=None, help="Secret to send [first of CALHOOK_AUTH_SECRETS].")
def send(files: tuple[str, ...], url: str | None, endpoint: str | None, secret: str | None) -> None:
    """POST each FILE to the ingress as Calenso would, and print the answer."""
    settings = cli_settings()
    target = url or f"http://127.0.0.1:{settings.port}/webhooks/calenso"
    header = settings.auth_header
    if endpoint:
        target = f"{target.rstrip('/')}/{endpoint}"
        named = settings.endpoints.get(endpoint)
        if named is not None:
            header = named.header
            if secret is None and named.secrets:
                secret = named.secrets[0].get_secret_value()
    if secret is None and settings.auth_secrets:
        secret = settings.auth_secrets[0].get_secret_value()
    failed = False
    for file in files:
        headers = {"Content-Type": "application/json"}
        if secret:
            headers[header] = secret
        request = urllib.request.Request(  # noqa: S310 (the URL is the operator's own)
            target, data=Path(file).read_bytes(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                status, answer = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, answer, failed = exc.code, exc.read().decode(), True
        except urllib.error.URLError as exc:
            raise click.ClickException(f"cannot reach {target}: {exc.reason}") from None
        click.echo(f"{file}: {status} {answer}")
    if failed:
        sys.exit(1)


@click.command()
def schema() -> None:
    """Print the JSON Schema of the envelope and the canonical event views."""
    from schemas import event_json_schema

    click.echo(json.dumps(event_json_schema(), indent=2, sort_keys=True))
