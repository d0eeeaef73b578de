"""`tunerun serve`: the fine-tuning service (OpenAI's API on your hardware) and its API keys.

    tunerun serve --config server.yaml [--host 127.0.0.1] [--port 8000]
    tunerun serve keys create PROJECT --config server.yaml     # prints the key, once
    tunerun serve keys list --config server.yaml
    tunerun serve keys revoke KEY_ID --config server.yaml
    tunerun serve render --config server.yaml | kubectl apply -f -   # the server itself on Kubernetes

FastAPI and uvicorn load inside the commands: the rest of the CLI stays as quick to start as it was.
"""
from __future__ import annotations

import os

import click
from rich.table import Table

from tunerun.jobs.cli.options import console, user_errors

config_option = click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
                             help="The server's configuration (server.yaml).")


@click.group(invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="The server's configuration (server.yaml).")
@click.option("--host", default=None, help="Address to listen on (default: the config's host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: the config's, 8000).")
@click.pass_context
@user_errors
def serve(ctx, config_file, host, port):
    """Serve OpenAI's fine-tuning API for many projects: files, jobs, events, checkpoints, models."""
    if ctx.invoked_subcommand is not None:
        return
    if config_file is None:
        raise click.UsageError("tunerun serve needs --config server.yaml")
    import uvicorn

    from tunerun.jobs.service.app import create_app
    from tunerun.jobs.service.config import load_server_config

    served = load_server_config(config_file)
    host, port = host or served.config.host, port or served.config.port
    os.umask(0o077)  # tenants' data, keys and the drivers' run folders: private on a shared login node
    console.print(f"serve  {len(served.config.models)} models · target {served.config.target} · "
                  f"{served.config.storage.uri} · http://{host}:{port}/v1 (API docs: /docs)")
    uvicorn.run(create_app(served), host=host, port=port, log_level="info")


@serve.group()
def keys():
    """API keys: one project each, shown once, stored only as a hash."""


def _key_store(config_file: str):
    from tunerun.jobs.service.config import load_server_config
    from tunerun.jobs.service.keys import KeyStore

    return KeyStore(load_server_config(config_file).config.storage)


@keys.command("create")
@click.argument("project")
@config_option
@user_errors
def create_key(project, config_file):
    """Make a key for PROJECT and print it (it cannot be shown again)."""
    _, key = _key_store(config_file).create(project)
    click.echo(key)


@keys.command("list")
@config_option
@user_errors
def list_keys(config_file):
    """Projects, key ids, when made and last used (never the keys)."""
    import datetime as dt

    def when(t):
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t else "-"

    table = Table("project", "key id", "created", "last used", "revoked", box=None)
    for record in _key_store(config_file).list():
        table.add_row(record.project, record.key_id, when(record.created_at), when(record.last_used_at),
                      when(record.revoked_at))
    console.print(table)


@keys.command("revoke")
@click.argument("key_id")
@config_option
@user_errors
def revoke_key(key_id, config_file):
    """Stop a key from working (at once, also for a running server)."""
    record = _key_store(config_file).revoke(key_id)
    console.print(f"revoked {record.key_id} (project {record.project})")


@serve.command("render")
@config_option
@user_errors
def render_manifests(config_file):
    """Print the Kubernetes manifests that run this server (`| kubectl apply -f -`): ServiceAccount, Role,
    RoleBinding, ConfigMap, Deployment, Service, and a vLLM Deployment and Service per managed inference engine."""
    from tunerun.jobs.service.config import load_server_config
    from tunerun.jobs.service.deploy import render_k8s

    click.echo(render_k8s(load_server_config(config_file)), nl=False)


COMMANDS = (serve,)
