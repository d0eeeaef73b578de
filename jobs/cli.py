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

from tunerun.jobs.errors import TunerunError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import TUNERUN_VERSION, ResolvedJob, resolve

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
@click.version_option(TUNERUN_VERSION, prog_name="tunerun")
def main():
    """Fine-tune open language models on your own data and hardware."""


@main.command()
@job_options
@user_errors
def validate(job_file, overrides, storage):
    """Check a job spec: every problem at once, with its line."""
    job = load_resolved(job_file, overrides, storage)
    if job.spec.storage.is_s3:
        from tunerun.cluster.s3 import missing_credentials

        missing = missing_credentials()
        if missing:  # a warning: the job may be rendered here and submitted from a shell that has them
            err_console.print(f"warning storage.uri: {job.spec.storage.uri} needs {' and '.join(missing)} in the "
                              "environment that submits the job (or AWS_PROFILE); credentials never go into the spec")
    steps = job.steps.total_steps_estimate
    console.print(f"{job_file}: OK · {job.spec.method.kind} · {job.steps.world_size} workers"
                  + (f" · ~{steps} steps" if steps else ""))
    if job.method_choice:
        console.print(job.method_choice)


@main.command()
@job_options
@click.option("--json", "as_json", is_flag=True, help="Print the resolved job and its memory plan as JSON.")
@click.option("--gpu-memory", default=None, metavar="SIZE",
              help="Memory of one GPU, e.g. 80GiB or 80GB (default: resources.gpu_memory_gb).")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="GPUs in all (default: nodes × workers_per_node × gpus_per_worker).")
@click.option("--cpu-memory", default=None, metavar="SIZE",
              help="RAM of one node, for CPU offload (default: resources.cpu_memory_gb).")
@user_errors
def plan(job_file, overrides, storage, as_json, gpu_memory, gpus, cpu_memory):
    """Show the resolved job (defaults, absolute paths, batch arithmetic, DeepSpeed config) and the memory
    each way of training it needs per GPU."""
    from tunerun.jobs import memory

    sizes = []
    for key, text in (("gpu_memory_gb", gpu_memory), ("cpu_memory_gb", cpu_memory)):
        if text is not None:
            try:
                sizes.append(f"resources.{key}={memory.parse_size(text) / memory.GB}")
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{key[:3]}-memory") from None
    job = load_resolved(job_file, (*overrides, *sizes), storage)
    try:
        mem = memory.plan_memory(job.spec, memory.hardware_for(job.spec, gpus=gpus))
        mem_json = mem.to_json()
    except memory.MemoryPlanError as exc:
        mem, mem_json = None, {"error": str(exc)}
    if as_json:
        click.echo(json.dumps({**job.model_dump(mode="json"), "memory": mem_json}, indent=2))
        return
    s = job.steps
    console.print(f"run     {job.run_id} → {job.run_uri}")
    console.print(f"method  {job.spec.method.kind} · model {job.spec.model.path} ({job.spec.model.dtype})")
    if job.method_choice:
        console.print(f"choice  {job.method_choice}")
    console.print(f"batch   {s.world_size} workers × {s.micro_batch_size} micro-batch × {s.grad_accumulation} "
                  f"accumulation = {s.global_batch_size} global")
    if s.total_steps_estimate:
        console.print(f"steps   {s.total_steps_estimate} (~{s.train_records_estimate} train records, "
                      f"{s.steps_per_epoch_estimate} steps/epoch × {job.spec.training.epochs} epochs"
                      + (", capped by max_steps" if job.spec.training.max_steps else "") + ")")
    console.print("\nresolved job:")
    click.echo(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    if mem is None:
        console.print(f"memory  not estimated: {mem_json['error']}")
        return
    hw, shape, gib = mem.hardware, mem.shape, memory.gib
    unit = "GPU" if hw.on_gpu else "worker (CPU RAM)"
    console.print(f"memory per {unit} · {shape.model_type} {shape.total_params:,} parameters · "
                  f"{hw.gpus} {'GPUs' if hw.on_gpu else 'CPU workers'} on {hw.nodes} node(s) · "
                  f"{gib(hw.device_bytes)} each, {memory.HEADROOM:.0%} kept free · micro-batch "
                  f"{job.spec.training.micro_batch_size} × {job.spec.data.max_seq_len} tokens")
    ckpt = job.spec.training.gradient_checkpointing
    table = Table("candidate", "weights", "gradients", "optimizer", f"activations{' (ckpt)' if ckpt else ''}",
                  "activations " + ("without ckpt" if ckpt else "with ckpt"), f"total / {unit.split()[0]}",
                  "CPU RAM / node", "fits", box=None)
    current = memory.estimate_for_spec(job.spec, hw)
    for c in mem.candidates:
        other = c.activations_no_checkpointing if ckpt else c.activations_checkpointing
        mine = c.kind == current.kind and c.zero == current.zero
        fits = "-" if c.fits is None else ("[green]yes[/green]" if c.fits else "[red]no[/red]")
        table.add_row(("▶ " if mine else "  ") + c.name, gib(c.weights), gib(c.gradients), gib(c.optimizer),
                      gib(c.activations), gib(other), gib(c.total), gib(c.cpu_per_node), fits)
    console.print(table)
    if current.name not in {c.name for c in mem.candidates}:
        console.print(f"this job ({current.name}): {gib(current.total)} per {unit.split()[0]}")


@main.command()
@job_options
@click.option("--run-id", default=None, help="Run id (default: name + UTC timestamp).")
@click.option("--resume", "resume_id", default=None, metavar="RUN",
              help="Continue run RUN from its newest complete checkpoint.")
@user_errors
def run(job_file, overrides, storage, run_id, resume_id):
    """Train on an embedded local Ray and follow the run until it ends."""
    from tunerun.cluster import local
    from tunerun.jobs.follow import RunFollower

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


@main.command()
@job_options
@click.option("--target", type=click.Choice(["local", "ray", "slurm", "k8s"]), default="local", show_default=True)
@click.option("--run-id", default=None)
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


@main.command()
@job_options
@click.option("--target", type=click.Choice(["k8s", "ray", "slurm"]), required=True)
@click.option("--run-id", default=None, help="Run id (default: name + UTC timestamp).")
@user_errors
def render(job_file, overrides, storage, target, run_id):
    """Print what a target would be given, without submitting: the sbatch script (`> train.sbatch`), the RayJob
    and ConfigMap (`| kubectl apply -f -`) or the Ray Job Submission request."""
    from tunerun.cluster.targets import target_module

    job = load_resolved(job_file, overrides, storage, run_id)
    click.echo(target_module(target).render(job), nl=False)


def _store(storage: str | None):
    """Runs under --storage; an S3 endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, as in the AWS CLI."""
    from tunerun.cluster.storage import RunStore
    from tunerun.jobs.spec import StorageSpec

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return RunStore(StorageSpec(uri=storage or DEFAULT_STORAGE, endpoint_url=endpoint))


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
    """State, step, last loss and checkpoints of one run, with the target's own view (Slurm, RayJob, Ray job)."""
    from tunerun.cluster.targets import module_for_run, target_view

    run_folder = _store(storage).open(run_id)
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


@main.command()
@click.argument("run_id")
@click.option("--storage", default=None)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends.")
@user_errors
def logs(run_id, storage, follow):
    """The run's driver log (Ray, DeepSpeed and worker output)."""
    from tunerun.cluster.targets import module_for_run
    from tunerun.jobs.follow import is_finished

    run_folder = _store(storage).open(run_id)
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


@main.command()
@click.argument("run_id")
@click.option("--storage", default=None)
@user_errors
def cancel(run_id, storage):
    """Stop a running run (its checkpoints stay)."""
    from tunerun.cluster.targets import module_for_run

    run_folder = _store(storage).open(run_id)
    target = module_for_run(run_folder)
    if target.cancel(run_folder):
        console.print(f"cancelled {run_id}")
    else:
        console.print(f"{run_id} is not running (state {target.status(run_folder).get('state')})")


def _last_train_metrics(run_folder) -> dict:
    return next((m for m in reversed(run_folder.read_jsonl("metrics.jsonl")) if "loss" in m), {})


# eval / export / report live in cli_results; it takes these helpers as arguments rather than importing this module.
from tunerun.jobs import cli_results  # noqa: E402

for _command in cli_results.commands(user_errors, console, _store):
    main.add_command(_command)

from tunerun.jobs.cli_data import data  # noqa: E402  (tunerun data prepare|inspect)
main.add_command(data)


if __name__ == "__main__":
    main()
