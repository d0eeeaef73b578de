"""`tunerun run`, `submit`, `render`, `list`, `status`, `logs`, `cancel`: a run's lifecycle on its target.

`run` trains on an embedded local Ray and follows the run; the others hand a job to a target or read the run
folder (the ledger), reconciled with the target's own view where it is reachable. Which targets exist, and what
each one does, comes from `tunerun.cluster.targets` alone; targets load inside the commands.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.table import Table

from tunerun.cluster import targets
from tunerun.cluster.run_folder import DRIVER_LOG, FINAL, METRICS, checkpoint_folders, final_weights, metric_rows
from tunerun.cluster.runs import RunInfo, RunState, disk_full_message, read_info
from tunerun.jobs.cli.options import (console, err_console, job_options, json_option, load_resolved,
                                      note_in_cli_log, open_run, run_argument, run_id_option, run_store,
                                      storage_option, user_errors)
from tunerun.jobs.tracking import check_tracking

EXIT_DISK_FULL = 4  # tunerun.trainer.entrypoint's: the driver could record its disk-full outcome nowhere
USER_FIXABLE = ("user", "disk_full")  # error kinds that exit 2: the user can fix them and resume


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
    check_tracking(job, job_file)
    console.print(f"run    {job.run_id} · {job.spec.method.label} · {job.spec.resources.num_workers} workers · "
                  f"local Ray · {job.spec.storage.uri}" + (" · resuming" if resume_id else ""))
    launch = [str(Path(job_file).absolute()), *overrides]
    run_folder, process = local.start(job, resume=bool(resume_id), launch=launch)
    # The driver runs in its own session: if this terminal goes away (or this process is killed), it trains on.
    where = shlex.join(["--storage", job.spec.storage.uri])
    console.print(f"follow tunerun logs {job.run_id} -f {where} · cancel: tunerun cancel {job.run_id} {where} "
                  "(Ctrl-C here cancels too)")
    target = local.LocalTarget()
    follower = RunFollower(run_folder, console, from_start=not resume_id)
    try:
        follower.follow(lambda: process.poll() is not None)
        info = target.status(run_folder)  # a driver killed outright recorded nothing: status says so
    except KeyboardInterrupt:
        console.print("cancelling (Ctrl-C): stopping Ray workers…")
        target.cancel(run_folder, warn=lambda message: err_console.print(f"warning {message}"))
        sys.exit(130)
    if process.returncode == EXIT_DISK_FULL and info.error_kind != "disk_full":
        info = info.model_copy(update={"state": RunState.FAILED, "error_kind": "disk_full", "error": disk_full_message(
            run_folder, f"the driver found no room to record its outcome in {run_folder.uri()}")})
    if info.error_kind == "disk_full":  # the run folder may not keep it: the CLI's own log does
        note_in_cli_log(f"{job.run_id}: {info.error}")
    _print_outcome(run_folder, info, follower)
    if info.state != RunState.SUCCEEDED:
        sys.exit(2 if info.error_kind in USER_FIXABLE else 1)


def _print_outcome(run_folder, info: RunInfo, follower) -> None:
    if info.state == RunState.SUCCEEDED:
        artifact = next((final_weights(name) for name in ("adapter", "model") if name in run_folder.list_dir(FINAL)),
                        FINAL)
        loss = ""
        if follower.first_eval is not None and follower.last_eval is not None:
            loss = f"held-out loss {follower.first_eval:.4f} → {follower.last_eval:.4f} · "
        gates = info.gates or {}
        verdict = ("gates passed · " if gates.get("passed") else "gates FAILED · ") if gates.get("results") else ""
        console.print(f"done   {loss}{verdict}weights: {run_folder.uri(artifact)} · "
                      f"metrics: {run_folder.uri(METRICS)}")
        return
    if info.error_kind in USER_FIXABLE:
        err_console.print(f"[red]error[/red] {info.error}", soft_wrap=True)
    else:
        driver = targets.get(info.target).handle(info)
        log = getattr(driver, "log", None) or run_folder.uri(DRIVER_LOG)  # the local driver's own log file
        err_console.print(f"[red]failed[/red] {_last_line(info.error or 'the run failed')}; full traceback in {log}",
                          soft_wrap=True)


def _last_line(error: str) -> str:
    """Worker tracebacks arrive inside the error text; the last line names the actual exception."""
    lines = [line.strip() for line in error.splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else error)[:500]


@click.command()
@job_options
@click.option("--target", "target_name", type=click.Choice(targets.names()), default="local", show_default=True)
@run_id_option
@click.option("--address", default=None, metavar="URL",
              help="The cluster to submit to, e.g. http://head:8265 for Ray's dashboard (sets " +
                   ", ".join(f"targets.{name}.{setting}" for name, setting in targets.addresses().items()) + ").")
@user_errors
def submit(job_file, overrides, storage, target_name, run_id, address):
    """Start a run on a target and return; follow it with `tunerun status` / `tunerun logs -f`."""
    target = targets.get(target_name)
    if address:
        if not target.address_setting:
            raise click.UsageError(f"--address applies to --target {' or '.join(targets.addresses())} only")
        overrides = (*overrides, f"targets.{target.name}.{target.address_setting}={address}")
    job = load_resolved(job_file, overrides, storage, run_id)
    check_tracking(job, job_file)
    run_folder = target.submit(job)
    console.print(f"submitted {job.run_id} · {target.name} · {target.describe(read_info(run_folder))} · "
                  f"{run_folder.uri()}")


@click.command()
@job_options
@click.option("--target", "target_name", type=click.Choice(targets.renderable()), required=True)
@run_id_option
@user_errors
def render(job_file, overrides, storage, target_name, run_id):
    """Print what a target would be given, without submitting: the sbatch script (`> train.sbatch`), the RayJob
    and ConfigMap (`| kubectl apply -f -`) or the Ray Job Submission request."""
    job = load_resolved(job_file, overrides, storage, run_id)
    click.echo(targets.get(target_name).render(job), nl=False)


@click.command("list")
@storage_option
@user_errors
def list_runs(storage):
    """Runs in a storage location, newest last, each in the state its own target reports (as `status` does); a run
    that ended succeeded, failed or cancelled is as it recorded, without asking its target again."""
    table = Table("run", "state", "method", "target", "step", "last loss", box=None)
    for run_folder in run_store(storage).runs():
        info = targets.for_run(run_folder).status(run_folder, ask_finished=False)
        last = _last_train_metrics(run_folder)
        table.add_row(run_folder.run_id, info.state_text, info.method or "?", info.target,
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
    run_folder = open_run(run_id, storage)
    target = targets.for_run(run_folder)
    info = target.status(run_folder)
    last = _last_train_metrics(run_folder)
    checkpoints = checkpoint_folders(run_folder)
    if as_json:
        click.echo(json.dumps({**info.to_json(), "last_metrics": last, "checkpoints": checkpoints}, indent=2))
        return
    line = f"state {info.state_text} · target {info.target} · {info.method}"
    if last:
        line += f" · step {last.get('step')}/{last.get('total_steps')} · last loss {last.get('loss', float('nan')):.4f}"
    line += f" · {len(checkpoints)} checkpoints"
    gates = info.gates or {}
    if gates.get("results"):
        failed = [f"{g['metric']} {g['value'] if g['value'] is None else round(g['value'], 4)} not {g['condition']}"
                  for g in gates["results"] if not g["passed"]]
        line += " · gates passed" if gates["passed"] else f" · gates failed ({'; '.join(failed)})"
    console.print(line)
    view = target.view(info)
    if view:
        console.print(f"target {view}")
    if info.error:
        console.print(f"error  {info.error}")
    if info.error_kind == "driver_gone":  # nothing was recorded: the driver's last words are the best clue
        for text in target.log_tail(run_folder):
            console.print(f"log    {text}", markup=False)


@click.command()
@run_argument
@storage_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
@user_errors
def logs(run_id, storage, follow):
    """The run's driver log (Ray, DeepSpeed and worker output), from wherever its target keeps it."""
    run_folder = open_run(run_id, storage)
    targets.for_run(run_folder).logs(run_folder, lambda text: click.echo(text, nl=False), follow=follow)


@click.command()
@run_argument
@storage_option
@user_errors
def cancel(run_id, storage):
    """Stop a running run (its checkpoints stay)."""
    run_folder = open_run(run_id, storage)
    target = targets.for_run(run_folder)
    if target.cancel(run_folder, warn=lambda message: err_console.print(f"warning {message}")):
        console.print(f"cancelled {run_id}")
    else:
        console.print(f"{run_id} is not running (state {target.status(run_folder).state})")


def _last_train_metrics(run_folder) -> dict:
    last = metric_rows(run_folder).last_train
    return last.model_dump(exclude_none=True) if last else {}


COMMANDS = (run, submit, render, list_runs, status, logs, cancel)
