"""``tunerun data prepare|inspect JOB``: the data a job will train on, prepared (and cached) before any run.

Importing this module loads neither torch nor transformers: they are imported inside the commands.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from tunerun.jobs.cli.options import console, job_options, load_resolved, user_errors


cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                                help="Cache root (default: $TUNERUN_CACHE or ~/.cache/tunerun/data).")


@click.group("data")
def data():
    """Prepare and inspect the data of a job (cached by content: unchanged inputs are not tokenized twice)."""


@data.command()
@job_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also put the prepared files here (default: only the cache folder, which is printed).")
@cache_dir_option
@user_errors
def prepare(job_file, overrides, storage, out, cache_dir):
    """Read, clean, tokenize and split the job's data; write train/eval files and the data report."""
    from tunerun.trainer.data.cache import publish

    _, folder, cached, report = _prepared(job_file, overrides, storage, cache_dir)
    if out:
        publish(folder, Path(out))
    where = Path(out).resolve() if out else folder
    console.print(f"files  {where} ({'reused from the cache' if cached else 'prepared'}): train.jsonl, eval.jsonl, "
                  "data_report.json, data_report.html, data_report.png")


@data.command()
@job_options
@click.option("-n", "--examples", default=3, show_default=True, help="Training examples to show.")
@cache_dir_option
@user_errors
def inspect(job_file, overrides, storage, examples, cache_dir):
    """Counts per cleaning step, token lengths, and examples exactly as the model sees them (⟦trained⟧)."""
    from tunerun.trainer.tokenizer import load_tokenizer

    job, folder, _, report = _prepared(job_file, overrides, storage, cache_dir)
    _print_steps(report)
    stats = report["token_lengths"]
    console.print("tokens " + " · ".join(f"{k} {_number(stats[k])}" for k in ("min", "mean", "p50", "p95", "max"))
                  + f"  (data.max_seq_len {job.spec.data.max_seq_len})")
    if report["packed_rows"]:
        console.print(f"packed {report['train_records']:,} examples into {report['packed_rows']:,} rows "
                      f"({report['packing_efficiency']:.0%} real tokens); examples below are cut out of the rows")
    tokenizer = load_tokenizer(job)
    for number, example in enumerate(itertools.islice(_examples(folder / "train.jsonl"), examples), start=1):
        _print_example(number, example, tokenizer)
    console.print(f"files  {folder}")


def _prepared(job_file, overrides, storage, cache_dir) -> tuple:
    """(job, prepared folder, whether it came from the cache, its data report), the summary printed."""
    from tunerun.trainer.data.cache import prepared_folder

    job = load_resolved(job_file, overrides, storage)
    folder, cached = prepared_folder(job, Path(cache_dir).resolve() if cache_dir else None)
    report = json.loads((folder / "data_report.json").read_text(encoding="utf-8"))
    _print_summary(report)
    return job, folder, cached, report


def _print_summary(report: dict) -> None:
    from tunerun.trainer.data.report import kept_records, steps

    removed = ", ".join(f"{name} {n:,}" for name, n in steps(report) if n)
    console.print(f"data   {report['records_read']:,} records ({report['format']}) → {kept_records(report):,} kept"
                  + (f" ({removed})" if removed else "")
                  + f" → {report['train_records']:,} train, {report['eval_records']:,} eval"
                  + (f"; {report['contaminated_eval']:,} eval examples copy a training one"
                     if report["contaminated_eval"] else ""))
    pii = report.get("pii_masked", {})
    if pii:
        console.print(f"PII    masked {sum(pii.values()):,}: " + ", ".join(f"{k} {n:,}" for k, n in pii.items()))
    if report["truncated"]:
        console.print(f"length {report['truncated']:,} examples truncated to data.max_seq_len")


def _print_steps(report: dict) -> None:
    from tunerun.trainer.data.report import steps

    table = Table("step", "removed", "left", box=None, pad_edge=False)
    left = report["records_read"]
    table.add_row("read", "", f"{left:,}")
    for name, n in steps(report):
        left -= n
        table.add_row(name, f"{n:,}", f"{left:,}")
    console.print(table)
    for problem in report.get("malformed_examples", [])[:5]:
        console.print(f"  malformed {escape(problem)}")


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _examples(path: Path):
    """Training examples from a prepared file, one at a time; packed rows are split at position 0."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            starts = [i for i, p in enumerate(row.get("position_ids", [0])) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                yield {"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]}


def _print_example(number: int, example: dict, tokenizer) -> None:
    from tunerun.trainer.data.render import IGNORE_INDEX, decode_segments

    trained = sum(label != IGNORE_INDEX for label in example["labels"])
    console.print(f"\n── example {number} · {len(example['input_ids'])} tokens, {trained} trained ⟦…⟧ ──────────")
    text = "".join(f"[bold green]⟦{escape(piece)}⟧[/bold green]" if is_trained else escape(piece)
                   for piece, is_trained in decode_segments(tokenizer, example["input_ids"], example["labels"]))
    console.print(text)


COMMANDS = (data,)
