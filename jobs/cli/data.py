"""``tunerun data prepare|inspect JOB``: the data a job will train on, prepared (and cached) before any run;
``tunerun data cache list|prune``: what that cache holds, and making room in it.

Importing this module loads neither torch nor transformers: they are imported inside the commands.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from tunerun.cluster.run_folder import TRAIN_FILE
from tunerun.jobs.cli.options import console, job_options, load_resolved, user_errors


cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                                help="Cache root (default: $TUNERUN_CACHE/prepared or ~/.cache/tunerun/prepared).")


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
    for number, example in enumerate(itertools.islice(_examples(folder / TRAIN_FILE), examples), start=1):
        _print_example(number, example, tokenizer)
    console.print(f"files  {folder}")


def _prepared(job_file, overrides, storage, cache_dir) -> tuple:
    """(job, prepared folder, whether it came from the cache, its data report), the summary printed."""
    from tunerun.trainer.data.cache import prepared_folder, read_report
    from tunerun.trainer.inputs import localize_data, localize_model

    # s3:// data and models come into the node cache first, exactly as the trainer fetches them: the content
    # hash then names the same prepared folder a run on this machine would use.
    job = localize_data(localize_model(load_resolved(job_file, overrides, storage)))
    folder, cached = prepared_folder(job, Path(cache_dir).resolve() if cache_dir else None)
    report = read_report(folder)
    _print_summary(report)
    return job, folder, cached, report


def _print_summary(report: dict) -> None:
    from tunerun.trainer.data.report import kept_records, pii_label, steps

    removed = ", ".join(f"{name} {n:,}" for name, n in steps(report) if n)
    console.print(f"data   {report['records_read']:,} records ({report['format']}) → {kept_records(report):,} kept"
                  + (f" ({removed})" if removed else "")
                  + f" → {report['train_records']:,} train, {report['eval_records']:,} eval"
                  + (f"; {report['contaminated_eval']:,} eval examples copy a training one"
                     if report["contaminated_eval"] else ""))
    pii = report.get("pii_masked", {})
    if pii:
        console.print(f"PII    masked {sum(pii.values()):,}: "
                      + ", ".join(f"{pii_label(k)} {n:,}" for k, n in pii.items()))
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
            if len(starts) == 2:  # one example in the row (a preference pair keeps its rejected answer)
                yield row
                continue
            for a, b in zip(starts, starts[1:]):
                yield {"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]}


def _print_example(number: int, example: dict, tokenizer) -> None:
    from tunerun.trainer.data.render import IGNORE_INDEX, decode_segments

    trained = sum(label != IGNORE_INDEX for label in example["labels"])
    pair = "rejected_input_ids" in example
    console.print(f"\n── example {number} · {len(example['input_ids'])} tokens, {trained} trained ⟦…⟧"
                  + (" · a preference pair: prompt, ⟦chosen⟧, then ⟪rejected⟫" if pair else "") + " ──────────")
    text = "".join(f"[bold green]⟦{escape(piece)}⟧[/bold green]" if is_trained else escape(piece)
                   for piece, is_trained in decode_segments(tokenizer, example["input_ids"], example["labels"]))
    console.print(text)
    if pair:  # the same prompt, then the answer ranked below the chosen one
        rejected = decode_segments(tokenizer, example["rejected_input_ids"], example["rejected_labels"])
        console.print("".join(f"[bold red]⟪{escape(piece)}⟫[/bold red]" for piece, is_trained in rejected
                              if is_trained))


# ---------------------------------------------------------------- the cache


AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# A hidden folder younger than this is a preparation running now; older, one that crashed.
BUSY_SECONDS = 6 * 3600


def parse_age(text: str) -> float:
    """'30d' → seconds (s, m, h, d, w)."""
    match = AGE.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not an age; write e.g. 30d, 12h or 2w", param_hint="--older-than")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


def parse_bytes(text: str) -> int:
    from tunerun.jobs.memory import parse_size

    try:
        return int(parse_size(text))
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (a bare number means GB)", param_hint="--keep-bytes") from None


def _cache_root(cache_dir: str | None) -> Path:
    from tunerun.trainer.data.cache import default_cache_root

    return Path(cache_dir).resolve() if cache_dir else default_cache_root()


@data.group("cache")
def cache():
    """The content-hash cache of prepared data ($TUNERUN_CACHE/prepared, default ~/.cache/tunerun/prepared)."""


@cache.command("list")
@cache_dir_option
@user_errors
def cache_list(cache_dir):
    """Every prepared dataset in the cache: size, when it was last used, what it was prepared from."""
    from tunerun.trainer.data.cache import cache_entries

    root = _cache_root(cache_dir)
    entries = cache_entries(root)
    table = Table("entry", "size", "last used", "examples", "prepared from", box=None, pad_edge=False)
    for entry in reversed(entries):  # most recently used first
        table.add_row(entry.path.name, _size(entry.size), _ago(entry.last_used),
                      f"{entry.records:,}" if entry.records is not None else "incomplete", escape(entry.files))
    if entries:
        console.print(table)
    console.print(f"cache  {root} · {len(entries)} entries, {_size(sum(e.size for e in entries))}")


@cache.command("prune")
@click.option("--older-than", "older_than", default=None, metavar="AGE",
              help="Remove entries not used for longer than AGE (e.g. 30d, 12h, 2w).")
@click.option("--keep-bytes", "keep_bytes", default=None, metavar="SIZE",
              help="Then remove the least recently used until at most SIZE remain (e.g. 50GiB).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@cache_dir_option
@user_errors
def cache_prune(older_than, keep_bytes, dry_run, cache_dir):
    """Remove prepared datasets: unused for longer than --older-than, then the least recently used beyond
    --keep-bytes. A run that needs one again prepares it again."""
    from tunerun.trainer.data.cache import cache_entries, prune_plan, remove_entry

    if older_than is None and keep_bytes is None:
        raise click.UsageError("say what to remove: --older-than AGE and/or --keep-bytes SIZE")
    root = _cache_root(cache_dir)
    entries = cache_entries(root)
    chosen = prune_plan(entries, time.time(), parse_age(older_than) if older_than else None,
                        parse_bytes(keep_bytes) if keep_bytes is not None else None, BUSY_SECONDS)
    verb = "would remove" if dry_run else "removed"
    for entry in chosen:
        if not dry_run:
            remove_entry(entry)
        console.print(f"{verb} {entry.path.name} · {_size(entry.size)} · last used {_ago(entry.last_used)}"
                      + ("" if entry.complete else " · incomplete"))
    kept = [e for e in entries if e not in chosen]
    console.print(f"cache  {root} · {verb} {len(chosen)} entries ({_size(sum(e.size for e in chosen))}), "
                  f"{len(kept)} left ({_size(sum(e.size for e in kept))})")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


COMMANDS = (data,)
