"""`tunerun serve`: the fine-tuning service (OpenAI's API on your hardware) and its API keys.

    tunerun serve --config server.yaml [--host 127.0.0.1] [--port 8000]
    tunerun serve keys create PROJECT --config server.yaml     # prints the key, once
    tunerun serve keys list --config server.yaml
    tunerun serve keys revoke KEY_ID --config server.yaml
    tunerun serve audit --config server.yaml [--project P] [--since 7d] [--json]   # who changed what, from where
    tunerun serve usage --config server.yaml [--since 30d] [--json]   # jobs, trained tokens, worker/GPU-hours
    tunerun serve render --config server.yaml | kubectl apply -f -   # the server itself on Kubernetes

FastAPI and uvicorn load inside the commands: the rest of the CLI stays as quick to start as it was.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import time

import click
from rich.table import Table
from rich.text import Text

from tunerun.jobs.cli.options import console, err_console, json_option, user_errors

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


def _storage(config_file: str):
    from tunerun.jobs.service.config import load_server_config

    return load_server_config(config_file).config.storage


def _key_store(storage):
    from tunerun.jobs.service.keys import KeyStore

    return KeyStore(storage)


def _audit_key_change(storage, action: str, record) -> None:
    """The admin's key changes go into the server's audit trail too: the key id, never the key."""
    from tunerun.jobs.service.audit import CLI_RESULT, AuditRecord, AuditTrail, cli_address

    entry = AuditRecord(time=time.time(), action=action, result=CLI_RESULT, project=record.project,
                        key_id=record.key_id, address=cli_address())
    if not AuditTrail(storage).record(entry):
        err_console.print(f"[yellow]warning[/yellow] done, but the audit trail could not record it ({action} "
                          f"{record.key_id}): see the message above")


@keys.command("create")
@click.argument("project")
@config_option
@user_errors
def create_key(project, config_file):
    """Make a key for PROJECT and print it (it cannot be shown again)."""
    storage = _storage(config_file)
    record, key = _key_store(storage).create(project)
    click.echo(key)
    _audit_key_change(storage, "create_key", record)


@keys.command("list")
@config_option
@user_errors
def list_keys(config_file):
    """Projects, key ids, when made and last used (never the keys)."""
    import datetime as dt

    def when(t):
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t else "-"

    table = Table("project", "key id", "created", "last used", "revoked", box=None)
    for record in _key_store(_storage(config_file)).list():
        table.add_row(record.project, record.key_id, when(record.created_at), when(record.last_used_at),
                      when(record.revoked_at))
    console.print(table)


@keys.command("revoke")
@click.argument("key_id")
@config_option
@user_errors
def revoke_key(key_id, config_file):
    """Stop a key from working (at once, also for a running server)."""
    storage = _storage(config_file)
    record = _key_store(storage).revoke(key_id)
    console.print(f"revoked {record.key_id} (project {record.project})")
    _audit_key_change(storage, "revoke_key", record)


class Since(click.ParamType):
    """A window's start: ``7d``, ``12h``, ``30m`` back from now, or a UTC date ``2026-11-01``; as a Unix time."""

    name = "since"
    AGO = re.compile(r"(\d+)([dhm])")
    UNIT_S = {"d": 86400, "h": 3600, "m": 60}

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        ago = self.AGO.fullmatch(value.strip())
        if ago:
            return time.time() - int(ago.group(1)) * self.UNIT_S[ago.group(2)]
        try:
            return dt.datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            self.fail(f"{value!r}: give a time back from now (7d, 12h, 30m) or a UTC date (2026-11-01)", param, ctx)


def _utc(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@serve.command("audit")
@config_option
@click.option("--project", default=None, help="Only this project's records.")
@click.option("--since", type=Since(), default="7d", show_default=True,
              help="From when: 7d, 12h, 30m back, or a UTC date (2026-11-01).")
@json_option
@user_errors
def audit(config_file, project, since, as_json):
    """Who changed what, from where, and how it ended: uploads, deletions, jobs created, cancelled, paused and
    resumed, sign-ins and -outs, keys made and revoked (key ids only, never a key or a file's content)."""
    from tunerun.jobs.service.audit import AuditTrail

    records = AuditTrail(_storage(config_file)).read(since=since, project=project)
    if as_json:
        for record in records:
            click.echo(json.dumps(record.to_json(), sort_keys=True))
        return
    table = Table("time (UTC)", "project", "key id", "address", "action", "object", "result", box=None)
    for r in records:  # Text: a path or an address is the client's to choose, never rich markup
        table.add_row(*(Text(str(value) if value is not None else "-") for value in
                        (_utc(r.time), r.project, r.key_id, r.address, r.action, r.object, r.result)))
    console.print(table)
    console.print(f"{len(records)} records since {_utc(since)} UTC")


@serve.command("usage")
@config_option
@click.option("--since", type=Since(), default="30d", show_default=True,
              help="From when: 30d, 12h back, or a UTC date (2026-11-01).")
@json_option
@user_errors
def usage(config_file, since, as_json):
    """Per project: jobs by status, trained tokens and worker-hours (GPU-hours on GPUs), from the run folders."""
    from tunerun.jobs.service.config import load_server_config
    from tunerun.jobs.service.files import FileStore
    from tunerun.jobs.service.fine_tuning import JobService
    from tunerun.jobs.service.usage import usage_by_project

    served = load_server_config(config_file)
    found = usage_by_project(JobService(served, FileStore(served.config.storage)), since=since)
    if as_json:
        click.echo(json.dumps({"since": since, "projects": [u.to_json() for u in found.values()]}, indent=2))
        return
    table = Table("project", "jobs", "trained tokens", "worker-hours", "GPU-hours", box=None)
    for u in found.values():
        jobs = ", ".join(f"{count} {status}" for status, count in sorted(u.jobs.items()))
        table.add_row(Text(u.project), jobs, f"{u.trained_tokens:,}", f"{u.worker_hours:,.2f}", f"{u.gpu_hours:,.2f}")
    console.print(table)
    console.print(f"since {_utc(since)} UTC · {len(found)} projects")


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
