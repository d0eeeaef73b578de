"""`tunerun run`, `submit`, `render`, `list`, `status`, `logs`, `cancel`: a run's lifecycle on its target.

`run` trains on an embedded local Ray and follows the run; the others hand a job to a target or read the run
folder (the ledger), adding the target's own view where it is reachable. Targets load inside the commands.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from tunerun.jobs.cli.options import (console, err_console, job_options, json_option, load_resolved, open_run,
                                      run_argument, run_id_option, run_store, storage_option, user_errors)


@click.command()
@job_options
@run_id_option
@click.option("--resume", "resume_id", default=None, metavar="RUN",
              help="Continue run RUN from its newest complete checkpoint.")
@user_errors
def run(job_file, overrides, storage, run_id, resume_id):
    """Train on an embedded local Ray and follow the run until it ends."""
    from tunerun.cluster import local
    from tunerun.jobs.cli.follow import RunFollower

    job = load_resolved(job_file, overrides, storage, resume_id or run_id)
    console.print(f"run    {job.run_id} · {job.spec.method.kind} · {job.spec.resources.num_workers} workers · "
                  f"local Ray · {job.spec.storage.uri}" + (" · resuming" if resume_id else ""))
    run_folder, process = local.submit(job, resume=bool(resume_id))
    follower = RunFollower(run_folder, console, from_start=not resume_id)
    try:
        follower.follow(lambda: process.poll() is not None)
        info = local.status(run_folder)  # a driver killed outright recorded nothing: status says so
    except KeyboardInterrupt:
        console.print("cancelling (Ctrl-C): stopping Ray workers…")
        local.cancel(run_folder)
        sys.exit(130)
    _print_outcome(job, run_folder, info, follower)
    if info["state"] != "succeeded":
        sys.exit(2 if info.get("error_kind") == "user" else 1)


def _print_outcome(job, run_folder, info, follower) -> None:
    if info["state"] == "succeeded":
        artifact = next((f"final/{name}" for name in ("adapter", "model") if name in run_folder.list_dir("final")),
                        "final")
        loss = ""
        if follower.first_eval is not None and follower.last_eval is not None:
            loss = f"held-out loss {follower.first_eval:.4f} → {follower.last_eval:.4f} · "
        gates = info.get("gates") or {}
        verdict = ("gates passed · " if gates.get("passed") else "gates FAILED · ") if gates.get("results") else ""
        console.print(f"done   {loss}{verdict}weights: {run_folder.uri(artifact)} · "
                      f"metrics: {run_folder.uri('metrics.jsonl')}")
        return
    if info.get("error_kind") == "user":
        err_console.print(f"[red]error[/red] {info.get('error')}", soft_wrap=True)
    else:
        err_console.print(f"[red]failed[/red] {_last_line(info.get('error', 'the run failed'))}; "
                          f"full traceback in {info.get('local', {}).get('log') or run_folder.uri('logs/driver.log')}",
                          soft_wrap=True)


def _last_line(error: str) -> str:
    """Worker tracebacks arrive inside the error text; the last line names the actual exception."""
    lines = [line.strip() for line in error.splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else error)[:500]


@click.command()
@job_options
@click.option("--target", type=click.Choice(["local", "ray", "slurm", "k8s"]), default="local", show_default=True)
@run_id_option
@click.option("--address", default=None, metavar="URL",
              help="--target ray: the Ray dashboard's address, e.g. http://head:8265 (sets targets.ray.address).")
@user_errors
def submit(job_file, overrides, storage, target, run_id, address):
    """Start a run on a target and return; follow it with `tunerun status` / `tunerun logs -f`."""
    from tunerun.cluster.targets import target_module

    if address and target != "ray":
        raise click.UsageError("--address applies to --target ray only")
    module = target_module(target)
    if address:
        overrides = (*overrides, f"targets.ray.address={address}")
    job = load_resolved(job_file, overrides, storage, run_id)
    submitted = module.submit(job)
    run_folder = submitted[0] if isinstance(submitted, tuple) else submitted  # local also returns the driver process
    info = run_folder.read_json("run.json")
    handle = ""
    if target == "k8s":
        handle = f" · RayJob {info['k8s']['namespace']}/{info['k8s']['rayjob']}"
    elif target == "ray":
        handle = f" · Ray job {info['ray']['submission_id']} at {info['ray']['address']}"
    elif target == "slurm":
        handle = f" · Slurm job {info['slurm']['job_id']}"
    console.print(f"submitted {job.run_id} · {target}{handle} · {run_folder.uri()}")


@click.command()
@job_options
@click.option("--target", type=click.Choice(["k8s", "ray", "slurm"]), required=True)
@run_id_option
@user_errors
def render(job_file, overrides, storage, target, run_id):
    """Print what a target would be given, without submitting: the sbatch script (`> train.sbatch`), the RayJob
    and ConfigMap (`| kubectl apply -f -`) or the Ray Job Submission request."""
    from tunerun.cluster.targets import target_module

    job = load_resolved(job_file, overrides, storage, run_id)
    click.echo(target_module(target).render(job), nl=False)


@click.command("list")
@storage_option
@user_errors
def list_runs(storage):
    """Runs in a storage location, newest last."""
    from tunerun.cluster import local

    table = Table("run", "state", "method", "target", "step", "last loss", box=None)
    for run_folder in run_store(storage).runs():
        info = local.status(run_folder)
        last = _last_train_metrics(run_folder)
        table.add_row(run_folder.run_id, info.get("state", "?"), info.get("method", "?"), info.get("target", "?"),
                      f"{last.get('step', 0)}/{last.get('total_steps', '?')}",
                      f"{last['loss']:.4f}" if "loss" in last else "-")
    console.print(table)


@click.command()
@run_argument
@storage_option
@json_option
@user_errors
def status(run_id, storage, as_json):
    """State, step, last loss and checkpoints of one run, with the target's own view (Slurm, RayJob, Ray job)."""
    from tunerun.cluster.targets import module_for_run, target_view

    run_folder = open_run(run_id, storage)
    info = module_for_run(run_folder).status(run_folder)
    last = _last_train_metrics(run_folder)
    checkpoints = run_folder.list_dir("checkpoints")
    if as_json:
        click.echo(json.dumps({**info, "last_metrics": last, "checkpoints": checkpoints}, indent=2))
        return
    line = f"state {info.get('state')} · target {info.get('target')} · {info.get('method')}"
    if last:
        line += f" · step {last.get('step')}/{last.get('total_steps')} · last loss {last.get('loss', float('nan')):.4f}"
    line += f" · {len(checkpoints)} checkpoints"
    gates = info.get("gates") or {}
    if gates.get("results"):
        failed = [f"{g['metric']} {g['value'] if g['value'] is None else round(g['value'], 4)} not {g['condition']}"
                  for g in gates["results"] if not g["passed"]]
        line += " · gates passed" if gates["passed"] else f" · gates failed ({'; '.join(failed)})"
    console.print(line)
    view = target_view(info)
    if view:
        console.print(f"target {view}")
    if info.get("error"):
        console.print(f"error  {info['error']}")


@click.command()
@run_argument
@storage_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
@user_errors
def logs(run_id, storage, follow):
    """The run's driver log (Ray, DeepSpeed and worker output)."""
    from tunerun.cluster.targets import module_for_run
    from tunerun.jobs.cli.follow import is_finished

    run_folder = open_run(run_id, storage)
    target_logs = getattr(module_for_run(run_folder), "logs", None)
    if target_logs:  # the target keeps the driver's output itself (Ray Jobs API, the RayJob's submitter pod)
        target_logs(run_folder, lambda text: click.echo(text, nl=False), follow=follow)
        return
    local_log = Path(run_folder.read_json("run.json").get("local", {}).get("log") or "/nonexistent")
    if not local_log.is_file():  # the driver ran elsewhere: read the copy it left in the run folder
        if run_folder.exists("logs/driver.log"):
            click.echo(run_folder.read_text("logs/driver.log"), nl=False)
        return
    offset = 0
    while True:
        with local_log.open(encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            chunk = handle.read()
            offset = handle.tell()
        click.echo(chunk, nl=False)
        if not follow or is_finished(run_folder):
            break
        time.sleep(1.0)


@click.command()
@run_argument
@storage_option
@user_errors
def cancel(run_id, storage):
    """Stop a running run (its checkpoints stay)."""
    from tunerun.cluster.targets import module_for_run

    run_folder = open_run(run_id, storage)
    target = module_for_run(run_folder)
    if target.cancel(run_folder):
        console.print(f"cancelled {run_id}")
    else:
        console.print(f"{run_id} is not running (state {target.status(run_folder).get('state')})")


def _last_train_metrics(run_folder) -> dict:
    return next((m for m in reversed(run_folder.read_jsonl("metrics.jsonl")) if "loss" in m), {})


COMMANDS = (run, submit, render, list_runs, status, logs, cancel)
