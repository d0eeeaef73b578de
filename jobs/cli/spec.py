"""`tunerun validate` and `tunerun plan`: a job spec checked, resolved and sized, before anything runs.

Both answer in about a second: neither loads weights, torch or Ray.
"""
from __future__ import annotations

import json

import click
import yaml
from rich.table import Table

from tunerun.jobs.cli.options import console, err_console, job_options, json_option, load_resolved, user_errors
from tunerun.jobs.tracking import check_tracking


@click.command()
@job_options
@user_errors
def validate(job_file, overrides, storage):
    """Check a job spec: every problem at once, with its line."""
    job = load_resolved(job_file, overrides, storage)
    check_tracking(job, job_file)
    if job.spec.storage.is_s3:
        from tunerun.cluster.s3 import missing_credentials

        missing = missing_credentials()
        if missing:  # a warning: the job may be rendered here and submitted from a shell that has them
            err_console.print(f"warning storage.uri: {job.spec.storage.uri} needs {' and '.join(missing)} in the "
                              "environment that submits the job (or AWS_PROFILE); credentials never go into the spec")
    steps = job.steps.total_steps_estimate
    console.print(f"{job_file}: OK · {job.spec.method.label} · {job.steps.world_size} workers"
                  + (f" · ~{steps} steps" if steps else ""))
    if job.method_choice:
        console.print(job.method_choice)


@click.command()
@job_options
@json_option
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
    console.print(f"method  {job.spec.method.label} · model {job.spec.model.path} ({job.spec.model.dtype})")
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


COMMANDS = (validate, plan)
