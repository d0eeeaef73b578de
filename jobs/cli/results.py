"""`tunerun eval`, `export`, `report`, `compare`: what a run produced, judged, handed over and set beside others.

They read the run folder only, so they work for any run wherever it trained. Importing this module loads neither
torch nor Ray: the work happens in `tunerun.trainer.evaluation`, `.export` and `.report`, imported inside the
commands.
"""
from __future__ import annotations

import json

import click
from rich.table import Table

from tunerun.cluster.run_folder import REPORT, base_record, on_demand_record_name, read_job
from tunerun.jobs.cli.options import (checkpoint_option, console, json_option, open_run, run_argument, storage_option,
                                      user_errors)
from tunerun.jobs.errors import StorageError
from tunerun.jobs.metrics import format_value


def checkpoint_step(run, job, checkpoint: int | str | None) -> int | None:
    """The step ``--checkpoint`` names; ``best`` ranks the run's complete checkpoints by their eval metric."""
    if checkpoint != "best":
        return checkpoint
    from tunerun.trainer.checkpoint import best_step

    return best_step(run, job.spec.checkpoint)


@click.command("eval")
@run_argument
@checkpoint_option
@storage_option
@user_errors
def eval_command(run_id, checkpoint, storage):
    """Re-evaluate a run's weights on its held-out set, in this process; writes eval/on-demand/<…>.json."""
    from tunerun.trainer.evaluation.on_demand import evaluate_run

    run = open_run(run_id, storage)
    job = read_job(run)
    checkpoint = checkpoint_step(run, job, checkpoint)
    console.print(f"eval   {run_id} · {job.spec.method.label} · loading weights…")
    record = evaluate_run(run, job, checkpoint)
    console.print(metrics_table(record, base_record(run)))
    print_gates(record.get("gates"))
    console.print(f"wrote  {run.uri(on_demand_record_name(record['source']))}")


@click.command("export")
@run_argument
@checkpoint_option
@click.option("--merge", is_flag=True, help="Merge the LoRA adapter into the (unquantised) base model.")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: safetensors folder (vLLM, TGI, transformers); gguf: merged model as one GGUF file "
                   "for llama.cpp / Ollama, with a Modelfile, checked against the HF model before success.")
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_k_m", "f32"]), default="f16", show_default=True,
              help="GGUF tensor type (llama.cpp's quantiser for q8_0 / q4_k_m).")
@click.option("--check-prompts", type=click.IntRange(min=1), default=None, metavar="N",
              help="GGUF: held-out prompts the file is checked on (default: eval.max_examples).")
@click.option("--system", default=None, metavar="TEXT",
              help="GGUF: the Modelfile's SYSTEM message (default: the chat template's own, if any).")
@click.option("--to", "to", default=None, metavar="DIR|s3://…",
              help="Target folder (default: <run>/exports/<source>-<adapter|merged|model|gguf-QUANT>).")
@click.option("--mlflow-model", "mlflow_model", default=None, metavar="NAME",
              help="Also log the exported folder to the run's MLflow run and register it as a new version of the "
                   "registered model NAME (needs tracking.mlflow in the job).")
@storage_option
@user_errors
def export_command(run_id, checkpoint, merge, fmt, quant, check_prompts, system, to, mlflow_model, storage):
    """Export a run's weights: LoRA adapter (PEFT), merged model or full model, as safetensors + model card;
    or, with --format gguf, the merged model as GGUF + Ollama Modelfile."""
    run = open_run(run_id, storage)
    job = read_job(run)
    checkpoint = checkpoint_step(run, job, checkpoint)
    if mlflow_model and job.spec.tracking.mlflow is None:
        raise StorageError(f"--mlflow-model: run {run_id} has no tracking.mlflow in its job, so no MLflow run to "
                           "register the model from; export without it and register the folder yourself")
    if fmt == "gguf":
        _export_gguf(run, job, checkpoint, quant, to, system, check_prompts)
        return
    if merge and job.spec.method.kind == "full":
        console.print("note   a full fine-tune is already a whole model: --merge changes nothing")
    from tunerun.trainer.export.hf import export_run  # torch: not before the run and the checkpoint are known

    target, weights = export_run(run, job, checkpoint, merge, to)
    if isinstance(target, str):  # uploaded to object storage
        console.print(f"export {weights.name} → {target} · download the folder and load it with "
                      "AutoModelForCausalLM.from_pretrained")
        return
    files = sorted(p for p in target.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    console.print(f"export {weights.name} → {target} · {len(files)} files, {size / 1e6:.1f} MB · "
                  "load with AutoModelForCausalLM.from_pretrained")
    if mlflow_model:
        from tunerun.trainer.tracking import register_export

        version = register_export(run, job, target, mlflow_model)
        console.print(f"mlflow {mlflow_model} version {version.version} · {version.source}")


@click.command("report")
@run_argument
@storage_option
@user_errors
def report_command(run_id, storage):
    """Write the run's report.html: curves, base vs tuned, gates, examples, data report."""
    from tunerun.trainer.report import write_report

    console.print(f"report {write_report(open_run(run_id, storage))}")


def _export_gguf(run, job, checkpoint, quant, to, system, check_prompts) -> None:
    from tunerun.trainer.export.gguf import export_gguf

    console.print(f"export {run.run_id} · merge → GGUF {quant} → check against the HF model on held-out prompts…")
    done = export_gguf(run, job, checkpoint, quant, to, system, check_prompts)
    check = done.check
    ties = f" (+{check['near_ties']} parting at a near-tie)" if check.get("near_ties") else ""
    console.print(f"check  greedy tokens equal to the HF model's on {check['same_tokens']}/{check['prompts']} "
                  f"prompts{ties} · exact match GGUF {format_value(check['exact_match_gguf'])} vs HF (unquantised) "
                  f"{format_value(check['exact_match_hf'])} · prompt text → same ids in llama.cpp "
                  f"{check['prompt_texts_same_ids']}/{check['prompt_texts']}")
    console.print(f"export {done.weights.name} → {done.target}/{done.gguf_name} · {done.size / 1e6:.1f} MB · "
                  f"{done.seconds:.0f}s · ollama create {job.spec.name} -f {done.target}/Modelfile")
    if run.exists(REPORT):  # the report shows the export's exact match beside the HF model's
        from tunerun.trainer.report import write_report

        console.print(f"report {write_report(run)}")


def metrics_table(record: dict, base: dict | None) -> Table:
    table = Table("metric", "base", record["source"], box=None)
    before = (base or {}).get("metrics", {})
    rows = {**record["metrics"], **{f"general_{k}": v for k, v in record.get("general", {}).items()}}
    for name, value in rows.items():
        if name.endswith("generated") or isinstance(value, bool):
            continue
        table.add_row(name, format_value(before.get(name) if not name.startswith("general_")
                                         else (base or {}).get("general", {}).get(name[8:])), format_value(value))
    return table


def print_gates(gates: dict | None) -> None:
    if not gates or not gates.get("results"):
        return
    verdict = "[green]passed[/green]" if gates["passed"] else "[red]failed[/red]"
    details = " · ".join(f"{g['metric']} {format_value(g['value'])} {g['condition']} {'✓' if g['passed'] else '✗'}"
                         for g in gates["results"])
    console.print(f"gates  {verdict}: {details}")


@click.command("compare")
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN RUN…")
@storage_option
@json_option
@user_errors
def compare_command(run_ids, storage, as_json):
    """Runs side by side: held-out metrics (the best of each marked ★), gates, data counts, hyperparameters."""
    from tunerun.cluster.compare import DATA_COUNTS, compare

    if len(run_ids) < 2:
        raise click.UsageError("name two or more runs to compare, e.g. tunerun compare RUN-A RUN-B (tunerun list shows them)")
    result = compare([open_run(run_id, storage) for run_id in run_ids])
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    table = Table("", *[r.run_id for r in result.runs], box=None)
    for label, values in (("status", [r.state for r in result.runs]), ("method", [r.method for r in result.runs]),
                          ("gates", [{True: "passed", False: "failed"}.get(r.gates_passed, "–") for r in result.runs]),
                          ("evaluated at step", [r.evaluated_step for r in result.runs])):
        table.add_row(label, *[format_value(v) for v in values])
    for metric in result.metrics:
        best = result.best.get(metric, [])
        table.add_row(metric, *[format_value(r.metrics[metric]) + (" ★" if r.run_id in best else "")
                                for r in result.runs])
    for name in ("epochs", "max_steps", "learning_rate", "global_batch_size", "seed"):
        table.add_row(name, *[format_value(r.hyperparameters[name]) for r in result.runs])
    for name in (*DATA_COUNTS, "pii_masked"):
        table.add_row(f"data: {name}", *[format_value(r.data[name]) for r in result.runs])
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning[/yellow]: {warning}")


COMMANDS = (eval_command, export_command, report_command, compare_command)
