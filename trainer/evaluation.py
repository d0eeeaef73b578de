"""Generation-based evaluation: does the model now answer the way the eval set says it should?

Each eval example in ``data/eval.jsonl`` is token ids with labels -100 on the prompt, rendered exactly as in
training. The prompt is everything before the final assistant turn (the last run of labelled tokens); the
reference is that turn's text. Greedy generation (``eval.max_new_tokens``) on the first ``eval.max_examples``
examples, each rank its shard, results gathered with ``all_gather_object``; then exact match and token F1
(SQuAD normalisation), ROUGE-L (`rouge-score`) and, with ``eval.label_pattern``, label accuracy.

The same general-instructions sample (``eval.general``) is scored before training and at the end: the drop
is the forgetting check. At the final eval the gates are applied and run.json records the verdict.
"""
from __future__ import annotations

import math
import re
import string
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100
GENERAL_DEFAULT = Path(__file__).with_name("general_eval.jsonl")
GENERATION_METRICS = ("exact_match", "f1", "rouge_l")
EXAMPLES_KEPT = 6  # examples (prompt, reference, output) kept per eval record for the report
GENERATION_BATCH = 8  # prompts per generate call; eval holds no gradients, so this can exceed micro_batch_size
_OPERATORS = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__, "==": float.__eq__}


# ── prompts and references ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class EvalItem:
    index: int
    prompt_ids: list[int]
    reference_ids: list[int]


def split_example(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the reference is the last contiguous run of labelled tokens, so for a
    multi-turn chat the prompt holds every earlier turn, exactly as the model saw them in training."""
    ids, labels = example["input_ids"], example["labels"]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not labelled:
        return list(ids), []
    end = start = labelled[-1] + 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(ids[:start]), list(ids[start:end])


def eval_items(examples: list[dict], max_examples: int) -> list[EvalItem]:
    items = []
    for index, example in enumerate(examples[:max_examples]):
        prompt, reference = split_example(example)
        if prompt and reference:
            items.append(EvalItem(index, prompt, reference))
    return items


def decode(tokenizer, ids: list[int]) -> str:
    # Special tokens (EOS, end-of-turn markers) are not part of an answer.
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_general_set(eval_spec, max_seq_len: int, tokenizer) -> list[dict]:
    """The general-instructions sample, tokenized by the same code (and chat template) as the training data."""
    from tunerun.jobs.spec import CleanSpec, DataSpec
    from tunerun.trainer.data.pipeline import prepare_data

    path = GENERAL_DEFAULT if eval_spec.general == "default" else Path(eval_spec.general)
    spec = DataSpec(train=str(path), eval_fraction=0.0, max_seq_len=max_seq_len,
                    clean=CleanSpec(dedup=False, near_dedup=False, pii="off"))
    return prepare_data(spec, tokenizer, seed=0).train


# ── metrics ─────────────────────────────────────────────────────────────────────────────────────────────────


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (any Unicode P* class) and articles, squash spaces."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch
                   for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _NormalizedTokens:
    """rouge-score's default tokenizer keeps only [a-z0-9]: accented and non-Latin text would score 0."""

    def tokenize(self, text: str) -> list[str]:
        return normalize_answer(text).split()


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_NormalizedTokens())
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def extract_label(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        return None
    return (match.group(1) if match.re.groups else match.group(0)).strip().casefold()


def score(predictions: list[str], references: list[str], metrics: list[str],
          label_pattern: str | None = None) -> dict:
    """Mean of each requested metric over the examples; label_accuracy over references the pattern matches."""
    n = max(len(predictions), 1)
    out = {}
    if "exact_match" in metrics:
        out["exact_match"] = sum(map(exact_match, predictions, references)) / n
    if "f1" in metrics:
        out["f1"] = sum(map(token_f1, predictions, references)) / n
    if "rouge_l" in metrics:
        out["rouge_l"] = sum(rouge_l(predictions, references)) / n
    if label_pattern is not None:
        pairs = [(extract_label(label_pattern, p), extract_label(label_pattern, r))
                 for p, r in zip(predictions, references)]
        scored = [(p, r) for p, r in pairs if r is not None]
        # None, not 0: a pattern that matches no reference measured nothing (a gate on it then fails, saying so)
        out["label_accuracy"] = sum(p == r for p, r in scored) / len(scored) if scored else None
    return out


# ── generation, sharded across ranks ────────────────────────────────────────────────────────────────────────


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models end turns with their own)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, *,
             lockstep: bool = False, calls: int | None = None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at the first stop token.

    With ``lockstep`` (DeepSpeed ZeRO-3, where every forward gathers parameters from all ranks) the caller passes
    the same ``calls`` on every rank; missing batches run on a dummy prompt and are thrown away, and
    ``synced_gpus`` keeps a rank that finished early stepping until all have.
    """
    import torch
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=pad, use_cache=True)
    batches = [prompts[i:i + GENERATION_BATCH] for i in range(0, len(prompts), GENERATION_BATCH)]
    if calls is not None:
        dummy = prompts[:1] or [[stops[0]]]
        batches += [dummy] * (calls - len(batches))
    outputs: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            width = max(map(len, batch))
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, synced_gpus=lockstep)
            outputs += [_until_stop(row[width:].tolist(), stops) for row in generated]
    finally:
        model.train(was_training)
    return outputs[:len(prompts)]


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def generate_sharded(model, tokenizer, items: list[EvalItem], max_new_tokens: int, device,
                     lockstep: bool = False) -> dict[int, str]:
    """{example index: output text} for all ``items``; every rank generates its shard, all ranks get all."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shard = items[rank::world]
    # Equal call counts on every rank, from numbers every rank knows without talking to the others.
    calls = math.ceil(math.ceil(len(items) / world) / GENERATION_BATCH) if lockstep else None
    generated = generate(model, tokenizer, [it.prompt_ids for it in shard], max_new_tokens, device,
                         lockstep=lockstep, calls=calls)
    local = {it.index: decode(tokenizer, ids) for it, ids in zip(shard, generated)}
    if world == 1:
        return local
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


def evaluate_generation(model, tokenizer, examples: list[dict], eval_spec, device, metrics: list[str],
                        lockstep: bool = False, label_pattern: str | None = None) -> tuple[dict, list[dict]]:
    """(metric means, the first EXAMPLES_KEPT examples as prompt/reference/output) for ``examples``."""
    items = eval_items(examples, eval_spec.max_examples)
    outputs = generate_sharded(model, tokenizer, items, eval_spec.max_new_tokens, device, lockstep)
    references = [decode(tokenizer, it.reference_ids) for it in items]
    predictions = [outputs[it.index] for it in items]
    result = score(predictions, references, metrics, label_pattern)
    result["generated"] = len(items)
    shown = [{"index": it.index, "prompt": tokenizer.decode(it.prompt_ids, skip_special_tokens=True),
              "reference": ref, "output": pred}
             for it, ref, pred in list(zip(items, references, predictions))[:EXAMPLES_KEPT]]
    return result, shown


# ── one evaluation during training (called from the train loop on every rank) ───────────────────────────────


def keep_4bit_training_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights when a model that keeps training is evaluated.

    On CPUs with AVX512-BF16, bitsandbytes ≥ 0.49 converts a Linear4bit weight in place to a CPU inference
    layout the first time the layer runs in eval mode without grad, and never converts it back. Training
    afterwards backpropagates through the repacked weight as if it had the plain layout: QLoRA still runs but
    learns from wrong gradients (measured on the tiny ticket task: held-out exact match 0.50 with a step-0
    eval, 0.96 without). The repacking only happens when the layer is not training, so these layers are made
    to always report training mode; they hold no dropout, so nothing else changes. Idempotent.
    """
    import sys

    if "bitsandbytes" not in sys.modules:  # only a qlora model holds 4-bit layers
        return
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and not getattr(module, "_tunerun_training_layout", False):
            module.register_forward_pre_hook(_report_training)
            module._tunerun_training_layout = True


def _report_training(module, args) -> None:
    module.training = True


def evaluate_during_training(engine, tokenizer, eval_set: list[dict], job, run, step: int, phase: str,
                             held_out: dict, rank: int) -> dict:
    """Generation metrics (+ the forgetting check at ``phase`` base/final, gates at final) on every rank; rank 0
    writes ``eval/base.json`` or ``eval/step-NNNNNN.json`` (and run.json's gates, report.html at final).
    Returns the metrics row for metrics.jsonl."""
    spec = job.spec.eval
    if not eval_set:
        require_eval_set(spec, "data/eval.jsonl holds no examples")
    lockstep = getattr(engine, "zero_stage", 0) == 3  # ZeRO-3 forwards are collective
    wanted = [m for m in GENERATION_METRICS if m in spec.metrics]
    metrics, examples = dict(held_out), []
    if eval_set and (wanted or spec.label_pattern):
        found, examples = evaluate_generation(engine.module, tokenizer, eval_set, spec, engine.device, wanted,
                                              lockstep, spec.label_pattern)
        metrics.update(found)
    record = {"step": step, "phase": phase, "base": phase == "base", "time": time.time(),
              "metrics": metrics, "examples": examples}
    if spec.general is not None and phase in ("base", "final"):
        general = load_general_set(spec, job.spec.data.max_seq_len, tokenizer)
        record["general"], record["general_examples"] = evaluate_generation(
            engine.module, tokenizer, general, spec, engine.device, list(GENERATION_METRICS), lockstep)
    if not metrics and "general" not in record:
        return {}  # no eval set and no forgetting check at this step: nothing was measured
    if rank == 0:
        _finish_record(record, run, job, phase)
    return metrics_row(record)


def require_eval_set(spec, why: str) -> None:
    """Without eval examples only the forgetting check can run: gates on eval-set metrics cannot be judged."""
    from tunerun.jobs.errors import DataError

    blocked = [name for name in spec.gates if name != "forgetting_drop"]
    if blocked:
        raise DataError(f"eval.gates on {', '.join(blocked)} need an evaluation set, but {why}; set data.eval or "
                        "data.eval_fraction > 0")


def _finish_record(record: dict, run, job, phase: str) -> None:
    """Forgetting drop and gates need the base record: only rank 0 reads the run folder."""
    spec = job.spec.eval
    if phase == "final":
        base = run.read_json("eval/base.json") if run.exists("eval/base.json") else None
        record["metrics"].update(forgetting(spec, base, record))
        record["gates"] = apply_gates(spec, record["metrics"])
        run.update_run_info(gates=record["gates"])
        run.event("gates_checked", passed=record["gates"]["passed"])
    run.write_json(eval_record_name(record["step"], phase), record)
    if phase == "final":
        _write_report(run)


def _write_report(run) -> None:
    # A broken report must not fail a finished training run: the CLI `tunerun report` can rebuild it.
    try:
        from tunerun.trainer.report import write_report

        write_report(run)
    except Exception as exc:  # noqa: BLE001
        run.event("report_failed", error=f"{type(exc).__name__}: {exc}"[:500])


def eval_record_name(step: int, phase: str) -> str:
    return "eval/base.json" if phase == "base" else f"eval/step-{step:06d}.json"


def forgetting(spec, base: dict | None, final: dict) -> dict:
    """forgetting_drop = base − final score on the general sample; flagged beyond eval.forgetting_threshold."""
    if spec.general is None or base is None or "general" not in base or "general" not in final:
        return {}
    drop = base["general"][spec.forgetting_metric] - final["general"][spec.forgetting_metric]
    return {"forgetting_drop": drop, "forgetting_flagged": drop > spec.forgetting_threshold}


def metrics_row(record: dict) -> dict:
    """Flat keys for metrics.jsonl: eval_loss, eval_exact_match, general_rouge_l, forgetting_drop, base…"""
    row = {}
    for name, value in record["metrics"].items():
        key = name if name.startswith("forgetting") else f"eval_{name}"
        row[key] = value
    for name, value in record.get("general", {}).items():
        row[f"general_{name}"] = value
    if record["base"]:
        row["base"] = True
    return row


# ── gates ───────────────────────────────────────────────────────────────────────────────────────────────────


def apply_gates(spec, metrics: dict) -> dict:
    """{passed, results: [{metric, condition, value, passed}]}; a gate whose metric was not measured fails."""
    results = []
    for name, op, threshold in spec.gate_checks():
        value = metrics.get(name)
        ok = value is not None and _OPERATORS[op](float(value), threshold)
        results.append({"metric": name, "condition": f"{op} {threshold:g}", "value": value, "passed": ok})
    return {"passed": all(r["passed"] for r in results), "results": results}


# ── on demand, in one local process (`tunerun eval`) ────────────────────────────────────────────────────────


def held_out_loss(model, examples: list[dict], pad_token_id: int, device, batch_size: int = 8) -> dict:
    """Token-weighted mean loss over ``examples`` (labelled tokens only), as the train loop measures it."""
    import torch

    from tunerun.trainer.data.pack import collate

    loss_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss_sum, tokens = loss_sum + float(loss) * n, tokens + n
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_run(run, job, checkpoint: int | None) -> dict:
    """Re-evaluate a checkpoint (or the final weights) of a finished or running run, in this process; writes
    ``eval/on-demand/<step-NNNNNN|final>.json`` and returns the record."""
    from tunerun.jobs.errors import DataError
    from tunerun.trainer.data.pack import load_examples
    from tunerun.trainer.export import find_weights, load_for_eval, run_local_path
    from tunerun.trainer.tokenizer import load_tokenizer

    spec = job.spec.eval
    eval_file = run_local_path(run, "data/eval.jsonl")
    eval_set = load_examples(eval_file)
    if not eval_set:
        what = "is missing" if not eval_file.is_file() else "holds no examples"
        raise DataError(f"{run.run_id}: the evaluation set data/eval.jsonl {what}; set data.eval or "
                        "data.eval_fraction > 0 in the job and rerun to evaluate")
    weights = find_weights(run, job, checkpoint)
    tokenizer = load_tokenizer(job)
    model, device = load_for_eval(job, weights)
    metrics = held_out_loss(model, eval_set, tokenizer.pad_token_id, device) if "loss" in spec.metrics else {}
    wanted = [m for m in GENERATION_METRICS if m in spec.metrics]
    found, examples = evaluate_generation(model, tokenizer, eval_set, spec, device, wanted,
                                          label_pattern=spec.label_pattern)
    metrics.update(found)
    record = {"step": weights.step, "phase": "on-demand", "source": weights.name, "base": False,
              "time": time.time(), "metrics": metrics, "examples": examples}
    if spec.general is not None:
        general = load_general_set(spec, job.spec.data.max_seq_len, tokenizer)
        record["general"], record["general_examples"] = evaluate_generation(
            model, tokenizer, general, spec, device, list(GENERATION_METRICS))
    base = run.read_json("eval/base.json") if run.exists("eval/base.json") else None
    metrics.update(forgetting(spec, base, record))
    record["gates"] = apply_gates(spec, metrics)
    run.write_json(f"eval/on-demand/{weights.name.replace('checkpoints/', '')}.json", record)
    return record
