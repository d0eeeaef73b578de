"""The `tunerun` command line.

Exit codes: 0 success, 2 a user error (one message, no traceback), 1 an internal failure (the traceback goes to
a log file, its path is printed). Importing this module loads neither torch nor Ray.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.table import Table

from tunerun.jobs.errors import TargetError, TunerunError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import ResolvedJob, resolve

# Piped output (logs, CI, scripts) gets long lines instead of rich's default 80-column wrapping.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
DEFAULT_STORAGE = os.environ.get("TUNERUN_STORAGE", "./runs")


def user_errors(command):
    """Turn TunerunError into one message + exit 2, anything else into a logged traceback + exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TunerunError as exc:
            err_console.print(f"[red]error[/red] {exc}", soft_wrap=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 - the user sees one line, the details go to a file
            fd, path = tempfile.mkstemp(prefix="tunerun-error-", suffix=".log")
            with os.fdopen(fd, "w") as handle:
                traceback.print_exc(file=handle)
            err_console.print(f"[red]internal error[/red] {sys.exc_info()[1]!r}; details in {path}")
            sys.exit(1)

    return wrapper


def job_options(command):
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a spec field, e.g. --set training.max_steps=20 (value parsed as YAML).")(command)
    command = click.option("--storage", default=None, help="Storage URI for the run folder (overrides storage.uri).")(command)
    return click.argument("job_file", type=click.Path(dir_okay=False))(command)


def load_resolved(job_file: str, overrides: tuple[str, ...], storage: str | None,
                  run_id: str | None = None) -> ResolvedJob:
    extra = [f"storage.uri={storage}"] if storage else []
    spec = load_job(job_file, [*overrides, *extra])
    return resolve(spec, run_id=run_id, source=job_file)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="tunerun")
def main():
    """Fine-tune open language models on your own data and hardware."""


@main.command()
@job_options
@user_errors
def validate(job_file, overrides, storage):
    """Check a job spec: every problem at once, with its line."""
    job = load_resolved(job_file, overrides, storage)
    steps = job.steps.total_steps_estimate
    console.print(f"{job_file}: OK · {job.spec.method.kind} · {job.steps.world_size} workers"
                  + (f" · ~{steps} steps" if steps else ""))


@main.command()
@job_options
@click.option("--json", "as_json", is_flag=True, help="Print the resolved job as JSON.")
@user_errors
def plan(job_file, overrides, storage, as_json):
    """Show the resolved job: defaults filled in, absolute paths, batch arithmetic, DeepSpeed config."""
    job = load_resolved(job_file, overrides, storage)
    if as_json:
        click.echo(json.dumps(job.model_dump(mode="json"), indent=2))
        return
    s = job.steps
    console.print(f"run     {job.run_id} → {job.run_uri}")
    console.print(f"method  {job.spec.method.kind} · model {job.spec.model.path} ({job.spec.model.dtype})")
    console.print(f"batch   {s.world_size} workers × {s.micro_batch_size} micro-batch × {s.grad_accumulation} "
                  f"accumulation = {s.global_batch_size} global")
    if s.total_steps_estimate:
        console.print(f"steps   {s.total_steps_estimate} (~{s.train_records_estimate} train records, "
                      f"{s.steps_per_epoch_estimate} steps/epoch × {job.spec.training.epochs} epochs"
                      + (f", capped by max_steps" if job.spec.training.max_steps else "") + ")")
    console.print("\nresolved job:")
    click.echo(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))


@main.command()
@job_options
@click.option("--run-id", default=None, help="Run id (default: name + UTC timestamp).")
@user_errors
def run(job_file, overrides, storage, run_id):
    """Train on an embedded local Ray and follow the run until it ends."""
    from tunerun.cluster import local
    from tunerun.jobs.follow import RunFollower, is_finished

    job = load_resolved(job_file, overrides, storage, run_id)
    console.print(f"run    {job.run_id} · {job.spec.method.kind} · {job.spec.resources.num_workers} workers · "
                  f"local Ray · {job.spec.storage.uri}")
    run_folder, process = local.submit(job)
    follower = RunFollower(run_folder, console)
    try:
        info = follower.follow(lambda: process.poll() is not None and is_finished(run_folder))
    except KeyboardInterrupt:
        console.print("cancelling (Ctrl-C): stopping Ray workers…")
        local.cancel(run_folder)
        sys.exit(130)
    _print_outcome(job, run_folder, info, follower)
    if info["state"] != "succeeded":
        sys.exit(2 if info.get("error_kind") == "user" else 1)


def _print_outcome(job, run_folder, info, follower) -> None:
    if info["state"] == "succeeded":
        final = run_folder.file("final")
        artifact = next((final / name for name in ("adapter", "model") if (final / name).exists()), final)
        loss = ""
        if follower.first_eval is not None and follower.last_eval is not None:
            loss = f"held-out loss {follower.first_eval:.4f} → {follower.last_eval:.4f} · "
        console.print(f"done   {loss}weights: {artifact} · metrics: {run_folder.file('metrics.jsonl')}")
        return
    if info.get("error_kind") == "user":
        err_console.print(f"[red]error[/red] {info.get('error')}", soft_wrap=True)
    else:
        err_console.print(f"[red]failed[/red] {_last_line(info.get('error', 'the run failed'))}; "
                          f"full traceback in {run_folder.file('logs/driver.log')}", soft_wrap=True)


def _last_line(error: str) -> str:
    """Worker tracebacks arrive inside the error text; the last line names the actual exception."""
    lines = [line.strip() for line in error.splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else error)[:500]


@main.command()
@job_options
@click.option("--target", type=click.Choice(["local", "ray", "slurm", "k8s"]), default="local", show_default=True)
@click.option("--run-id", default=None)
@user_errors
def submit(job_file, overrides, storage, target, run_id):
    """Start a run on a target and return; follow it with `tunerun status` / `tunerun logs -f`."""
    if target != "local":
        raise TargetError(f"target '{target}' is not available yet; use --target local (or `tunerun run`)")
    from tunerun.cluster import local

    job = load_resolved(job_file, overrides, storage, run_id)
    run_folder, _ = local.submit(job)
    console.print(f"submitted {job.run_id} · local · {run_folder.path}")


def _store(storage: str | None):
    from tunerun.cluster.storage import RunStore

    return RunStore(storage or DEFAULT_STORAGE)


@main.command("list")
@click.option("--storage", default=None, help=f"Storage URI (default {DEFAULT_STORAGE}).")
@user_errors
def list_runs(storage):
    """Runs in a storage location, newest last."""
    from tunerun.cluster import local

    table = Table("run", "state", "method", "target", "step", "last loss", box=None)
    for run_folder in _store(storage).runs():
        info = local.status(run_folder)
        last = _last_train_metrics(run_folder)
        table.add_row(run_folder.run_id, info.get("state", "?"), info.get("method", "?"), info.get("target", "?"),
                      f"{last.get('step', 0)}/{last.get('total_steps', '?')}",
                      f"{last['loss']:.4f}" if "loss" in last else "-")
    console.print(table)


@main.command()
@click.argument("run_id")
@click.option("--storage", default=None)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def status(run_id, storage, as_json):
    """State, step, last loss and checkpoints of one run."""
    from tunerun.cluster import local

    run_folder = _store(storage).open(run_id)
    info = local.status(run_folder)
    last = _last_train_metrics(run_folder)
    checkpoints = run_folder.list_dir("checkpoints")
    if as_json:
        click.echo(json.dumps({**info, "last_metrics": last, "checkpoints": checkpoints}, indent=2))
        return
    line = f"state {info.get('state')} · target {info.get('target')} · {info.get('method')}"
    if last:
        line += f" · step {last.get('step')}/{last.get('total_steps')} · last loss {last.get('loss', float('nan')):.4f}"
    line += f" · {len(checkpoints)} checkpoints"
    console.print(line)
    if info.get("error"):
        console.print(f"error  {info['error']}")


@main.command()
@click.argument("run_id")
@click.option("--storage", default=None)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
@user_errors
def logs(run_id, storage, follow):
    """The run's driver log (Ray, DeepSpeed and worker output)."""
    from tunerun.jobs.follow import is_finished

    run_folder = _store(storage).open(run_id)
    log_file = run_folder.file("logs/driver.log")
    offset = 0
    while True:
        if log_file.exists():
            with log_file.open(encoding="utf-8", errors="replace") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            click.echo(chunk, nl=False)
        if not follow or is_finished(run_folder):
            break
        time.sleep(1.0)


@main.command()
@click.argument("run_id")
@click.option("--storage", default=None)
@user_errors
def cancel(run_id, storage):
    """Stop a running run (its checkpoints stay)."""
    from tunerun.cluster import local

    run_folder = _store(storage).open(run_id)
    if local.cancel(run_folder):
        console.print(f"cancelled {run_id}")
    else:
        console.print(f"{run_id} is not running (state {local.status(run_folder).get('state')})")


def _last_train_metrics(run_folder) -> dict:
    return next((m for m in reversed(run_folder.read_jsonl("metrics.jsonl")) if "loss" in m), {})


if __name__ == "__main__":
    main()
